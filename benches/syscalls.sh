#!/usr/bin/env bash
# Counts a server's syscalls per completed stream, by kind, in one load-bench
# cell: the load generator starts the server (the ceiling, or the example
# server on SQLite or Postgres), `perf record -e raw_syscalls:sys_enter`
# follows the server for SAMPLE seconds inside the measured window, and each
# count is divided by the streams the window completed in that time (at the
# cell's reported rate). Round 13 of benches/README.md has a table made so.
#
# Usage: benches/syscalls.sh DELAY_MS CLIENTS TARGET [SERVER_BIN]
#   TARGET: ceiling | sqlite | postgres; SERVER_BIN defaults to
#   target/release/chat-server-example (unused for the ceiling)
# Environment (optional): WARMUP=10 DURATION=20 SAMPLE=5 (seconds),
#   PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432
# Needs perf (Debian: linux-perf) and the right to trace (root, or
# kernel.perf_event_paranoid=-1).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 3 ]] || { sed -n 2,15p "$0" >&2; exit 2; }
delay=$1 clients=$2 target=$3 server=${4:-target/release/chat-server-example}
WARMUP=${WARMUP:-10} DURATION=${DURATION:-20} SAMPLE=${SAMPLE:-5}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
LOADGEN=target/release/chat-loadgen
CEILING_BIN=target/release/chat-ceiling
[[ -x $LOADGEN && -x $CEILING_BIN ]] || cargo build --release -p chat-bench
(( SAMPLE + 2 <= DURATION )) || { echo "SAMPLE must be at least 2 s shorter than DURATION" >&2; exit 2; }
CELL_WORK=$(mktemp -d)
trap 'rm -rf "$CELL_WORK"' EXIT
source benches/cell.sh
bench_env "$delay"

json=$CELL_WORK/run.json
run_cell "$target" "$server" --concurrency "$clients" --duration "$DURATION" \
  --warmup "$WARMUP" --threads 2 --json "$json" 2>"$CELL_WORK/err" &
cell=$!
# This cell's load generator (not any other one running) and its child, the
# server; sampled once the window is open.
sleep $((WARMUP + 1))
loadgen=$(pgrep -P "$cell" -f "^$LOADGEN") || { cat "$CELL_WORK/err" >&2; exit 1; }
pid=$(pgrep -P "$loadgen" | head -1)
perf record -q -e raw_syscalls:sys_enter -p "$pid" -o "$CELL_WORK/perf.data" -- sleep "$SAMPLE" 2>/dev/null
wait "$cell" || { cat "$CELL_WORK/err" >&2; exit 1; }

perf script -i "$CELL_WORK/perf.data" -F trace 2>/dev/null | awk '{print $2}' >"$CELL_WORK/nrs"
python3 - "$json" "$CELL_WORK/nrs" "$SAMPLE" "$target" <<'EOF'
import collections, json, re, sys
report, nrs, sample, target = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3]), sys.argv[4]
names = {}
try:
    for line in open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"):
        m = re.match(r"#define __NR_(\w+) (\d+)", line)
        if m:
            names[m.group(2)] = m.group(1)
except OSError:
    pass  # numbers only
counts = collections.Counter(l.strip() for l in open(nrs) if l.strip())
streams = report["streams_per_s"] * sample
print(f"{target}: {report['streams_per_s']:,.0f} streams/s, ~{streams:,.0f} streams in the {sample:g} s sampled; syscalls per stream:")
for nr, n in counts.most_common(12):
    print(f"  {names.get(nr, 'NR ' + nr):<16} {n / streams:8.2f}")
print(f"  {'all':<16} {sum(counts.values()) / streams:8.2f}")
EOF
