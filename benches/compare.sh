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
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PORT=0 BIND=127.0.0.1 TOKENS=64 TOKEN_DELAY_MS=$delay RUST_LOG=${RUST_LOG:-warn}
export AUTH=dev-header MODEL=demo SHUTDOWN_GRACE_MS=1000

# One run: label, then the server command; prints one line.
run() {
  local label=$1; shift
  local json=$work/run.json db=""
  local args=(--concurrency "$clients" --duration "$DURATION" --warmup "$WARMUP" --threads 2 --json "$json")
  if [[ $label == ceiling ]]; then
    "$LOADGEN" "${args[@]}" -- "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; return 1; }
  elif [[ $STORE == postgres ]]; then
    db="compare_$$_$RANDOM"
    psql -q "$PG_ADMIN_URL/postgres" -c "CREATE DATABASE $db" >/dev/null
    DATABASE_URL="$PG_ADMIN_URL/$db" "$LOADGEN" "${args[@]}" -- "$@" >/dev/null 2>"$work/err" \
      || { cat "$work/err" >&2; return 1; }
    psql -q "$PG_ADMIN_URL/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
  else
    rm -f "$work"/bench.db*
    DATABASE_URL="sqlite://$work/bench.db" "$LOADGEN" "${args[@]}" -- "$@" >/dev/null 2>"$work/err" \
      || { cat "$work/err" >&2; return 1; }
  fi
  python3 - "$json" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
srv = r.get("server") or {}
per = srv.get("cpu_ms_per_stream")
lg = r["loadgen_cpu_ms"] / r["streams"] if r.get("streams") and r.get("loadgen_cpu_ms") else None
norm = f"{per / lg:.3f}" if per and lg else "-"
print(f"{sys.argv[2]:>8}  {r['streams_per_s']:>9,.1f} streams/s  ttft p50/p99 {r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} ms"
      f"  rss {srv.get('peak_rss_mb')} MB  cpu/stream {per} ms  loadgen {lg and round(lg, 3)} ms"
      f"  norm {norm}  errors {r['error_total']}")
PY
}

echo "cell: ${delay} ms / ${clients} clients on $STORE, $runs interleaved runs; A=$bin_a B=$bin_b"
for _ in $(seq 1 "$runs"); do
  if [[ -n ${CEILING:-} ]]; then run ceiling "$CEILING_BIN"; fi
  run A "$bin_a"
  run B "$bin_b"
done
