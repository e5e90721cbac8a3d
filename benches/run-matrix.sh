#!/usr/bin/env bash
# Runs the load-bench matrix: token delay x concurrency x target (the bare SSE
# ceiling, the example server on SQLite, the example server on Postgres), each
# cell against a freshly started server, and writes JSON per cell plus a
# markdown table (results.md) and all cells (results.json) to
# benches/results/<UTC stamp>/ (and benches/results/latest.{md,json}).
#
# Environment (all optional):
#   DELAYS="0 20"                   token delays, ms
#   CONCURRENCY="50 500 5000 10000" virtual users
#   CELLS="0:50 20:500"             delay:users pairs to run instead of DELAYS x CONCURRENCY
#   TARGETS="ceiling sqlite postgres"
#   DURATION=10 WARMUP=2            seconds per cell (measured / not measured)
#   WARMUP_BIG=10                   warmup of cells with >= 5,000 users: all users start
#                                   at once, so the first streams end together; the
#                                   window opens once completions have spread out
#   WARMUP_HUGE=25                  warmup of cells with >= 10,000 users (an overloaded
#                                   server's streams take ~20 s there)
#   WARMUP_PACED=10                 least warmup of cells with a token delay: a stream
#                                   lasts ~1.3 s there, and users that all started at
#                                   once post in waves for several stream lengths (a
#                                   fresh database meets those waves too); 2 s covered
#                                   ~1.5 of them
#   REPEAT=1                        runs of each cell; the targets of a cell take turns
#                                   (ceiling, sqlite, postgres, ceiling, ...), each ratio
#                                   is taken against the ceiling run just before, and the
#                                   report gives the median (this machine's speed drifts
#                                   by 10-20% over minutes)
#   PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432   a fresh database per cell is made there
#   THREADS=2                       load generator worker threads
#   NO_BUILD=1                      reuse target/release binaries
set -euo pipefail
cd "$(dirname "$0")/.."

DELAYS=${DELAYS:-"0 20"}
CONCURRENCY=${CONCURRENCY:-"50 500 5000 10000"}
TARGETS=${TARGETS:-"ceiling sqlite postgres"}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
WARMUP_BIG=${WARMUP_BIG:-10}
WARMUP_HUGE=${WARMUP_HUGE:-25}
WARMUP_PACED=${WARMUP_PACED:-10}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-1}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
BIN=target/release
for t in $TARGETS; do
  case $t in ceiling | sqlite | postgres) ;; *) echo "unknown target $t" >&2; exit 2 ;; esac
done

if [[ -z "${NO_BUILD:-}" ]]; then
  cargo build --release -p chat-server-example -p chat-bench
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=benches/results/$stamp
mkdir -p "$out"
CELL_WORK=$(mktemp -d)
trap 'rm -rf "$CELL_WORK"' EXIT
LOADGEN=$BIN/chat-loadgen CEILING_BIN=$BIN/chat-ceiling
source benches/cell.sh

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "memory: $(free -h | awk '/^Mem:/{print $2}')"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  echo "repeats: ${REPEAT} per cell, interleaved"
  echo "cell: warmup ${WARMUP}s (at least ${WARMUP_PACED}s with a token delay, ${WARMUP_BIG}s from 5,000 users, ${WARMUP_HUGE}s from 10,000), measured ${DURATION}s, load generator threads ${THREADS}"
} > "$out/machine.txt"

if [[ -z "${CELLS:-}" ]]; then
  CELLS=$(for d in $DELAYS; do for c in $CONCURRENCY; do printf '%s:%s ' "$d" "$c"; done; done)
fi

for pair in $CELLS; do
  delay=${pair%%:*} c=${pair##*:}
  for rep in $(seq 1 "$REPEAT"); do
    for target in $TARGETS; do
      name="d${delay}-c${c}-${target}"
      file=$name
      if (( REPEAT > 1 )); then file="$name.r$rep"; fi
      warm=$WARMUP
      if (( c >= 5000 )); then warm=$WARMUP_BIG; fi
      if (( c >= 10000 )); then warm=$WARMUP_HUGE; fi
      if (( delay > 0 && warm < WARMUP_PACED )); then warm=$WARMUP_PACED; fi
      common=(--concurrency "$c" --duration "$DURATION" --warmup "$warm" --threads "$THREADS"
        --label "$name" --tag "target=$target" --tag "delay_ms=$delay" --tag "repeat=$rep" --json "$out/$file.json")
      bench_env "$delay"
      run_cell "$target" "$BIN/chat-server-example" "${common[@]}" || echo "cell $name failed"
    done
  done
done

python3 benches/report.py "$out"
cp "$out/results.md" benches/results/latest.md
cp "$out/results.json" benches/results/latest.json
cat "$out/results.md"
