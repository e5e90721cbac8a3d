#!/usr/bin/env bash
# Compares two builds of the example server on one load-bench cell, in
# interleaved runs (A, B, A, B, ...), each against a freshly started server
# and a fresh database. Absolute streams/s drift by 10-30% within minutes on
# the shared bench machine, so only interleaved runs compare, and the line
# also gives `norm`: the server's CPU per stream over the load generator's,
# which drifts much less (both share the same cores at the same moment).
#
# Usage: benches/compare.sh DELAY_MS CLIENTS RUNS BIN_A BIN_B
#   e.g. benches/compare.sh 20 5000 3 /tmp/before /tmp/after
# Environment (optional):
#   STORE=sqlite|postgres   (default sqlite; postgres makes a database per run)
#   CEILING=1               also run the ceiling before each pair
#   WARMUP=10 DURATION=10   seconds
#   PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432
# Copy the binaries out of target/ first, so a rebuild cannot swap them mid-run.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 5 ]] || { sed -n 2,17p "$0" >&2; exit 2; }
delay=$1 clients=$2 runs=$3 bin_a=$4 bin_b=$5
STORE=${STORE:-sqlite}
WARMUP=${WARMUP:-10} DURATION=${DURATION:-10}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
LOADGEN=target/release/chat-loadgen
CEILING_BIN=target/release/chat-ceiling
[[ -x $LOADGEN && -x $CEILING_BIN ]] || cargo build --release -p chat-bench
CELL_WORK=$(mktemp -d)
trap 'rm -rf "$CELL_WORK"' EXIT
source benches/cell.sh
bench_env "$delay"

# One run: label, then the server binary; prints one line.
run() {
  local label=$1 server=$2 target=$STORE json=$CELL_WORK/run.json
  if [[ $label == ceiling ]]; then target=ceiling; fi
  run_cell "$target" "$server" --concurrency "$clients" --duration "$DURATION" \
    --warmup "$WARMUP" --threads 2 --json "$json" 2>"$CELL_WORK/err" \
    || { cat "$CELL_WORK/err" >&2; return 1; }
  python3 benches/cells.py line "$json" "$label"
}

echo "cell: ${delay} ms / ${clients} clients on $STORE, $runs interleaved runs; A=$bin_a B=$bin_b"
for _ in $(seq 1 "$runs"); do
  if [[ -n ${CEILING:-} ]]; then run ceiling "$CEILING_BIN"; fi
  run A "$bin_a"
  run B "$bin_b"
done
