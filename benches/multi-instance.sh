#!/usr/bin/env bash
# Streams/s of the example server as 1 process vs 3 processes sharing one
# Postgres, coordinated through Redis (REDIS_URL) or Postgres alone
# (COORDINATION=postgres), against the single-instance server. Each 3-process
# cell runs one chat-loadgen per instance at once (CONCURRENCY/3 users each)
# and sums their streams/s. Writes benches/results/multi-instance/processes-<stamp>.{md,json}.
#
# Environment (all optional):
#   DELAYS="0 20"  CONCURRENCY=150  DURATION=8  WARMUP=2  TOKENS=64
#   PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432  REDIS_URL=redis://127.0.0.1:6379
#   NO_BUILD=1     reuse target/release binaries
set -euo pipefail
cd "$(dirname "$0")/.."

DELAYS=${DELAYS:-"0 20"}
CONCURRENCY=${CONCURRENCY:-150}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
TOKENS=${TOKENS:-64}
PG_ADMIN_URL=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}
REDIS=${REDIS_URL:-redis://127.0.0.1:6379}
BIN=target/release

if [[ -z "${NO_BUILD:-}" ]]; then
  cargo build --release -p chat-server-example -p chat-bench
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=benches/results/multi-instance
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a server in the background (its stdout to $1).
start_server() {
  local log=$1; shift
  env "$@" PORT=0 MODEL=demo RUST_LOG=warn "$BIN/chat-server-example" >"$log" 2>&1 &
  pids+=($!)
}

# Prints the URL a server wrote to its log.
server_url() {
  local url
  for _ in $(seq 1 200); do
    if url=$(grep -m1 -o 'http://[0-9.:]*' "$1" 2>/dev/null); then
      echo "$url"
      return
    fi
    sleep 0.05
  done
  echo "server did not start: $(cat "$1")" >&2
  exit 1
}

stop_servers() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

rows=()
echo "| token delay ms | coordination | instances | users | streams/s | TTFT p50 / p99 ms (per instance) | errors |" > "$work/table.md"
echo "|---|---|---|---|---|---|---|" >> "$work/table.md"
for delay in $DELAYS; do
  for cell in "none 1" "redis 1" "redis 3" "postgres 1" "postgres 3"; do
    read -r mode n <<<"$cell"
    db="mi_bench_$(date +%s%N)"
    psql "$PG_ADMIN_URL/postgres" -qc "CREATE DATABASE $db" >/dev/null
    dburl="$PG_ADMIN_URL/$db"
    envs=(DATABASE_URL="$dburl" TOKENS="$TOKENS" TOKEN_DELAY_MS="$delay" COORDINATION_NAMESPACE="$db")
    case $mode in
      redis) envs+=(REDIS_URL="$REDIS") ;;
      postgres) envs+=(COORDINATION=postgres) ;;
    esac
    urls=()
    for i in $(seq 1 "$n"); do
      start_server "$work/server-$i.log" "${envs[@]}"
    done
    for i in $(seq 1 "$n"); do
      urls+=("$(server_url "$work/server-$i.log")")
    done
    per=$((CONCURRENCY / n))
    lg=()
    for i in "${!urls[@]}"; do
      "$BIN/chat-loadgen" --url "${urls[$i]}" -c "$per" -d "$DURATION" -w "$WARMUP" --threads 1 \
        --label "$mode-$n-$i" >"$work/lg-$i.json" 2>"$work/lg-$i.err" &
      lg+=($!)
    done
    for p in "${lg[@]}"; do wait "$p"; done
    stop_servers
    psql "$PG_ADMIN_URL/postgres" -qc "DROP DATABASE $db WITH (FORCE)" >/dev/null
    row=$(python3 - "$delay" "$mode" "$n" "$CONCURRENCY" "$work"/lg-*.json <<'EOF'
import json, sys
delay, mode, n, users, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
reps = [json.load(open(f)) for f in files]
sps = sum(r["streams_per_s"] for r in reps)
ttft = ", ".join(f'{r["ttft_ms"]["p50"]} / {r["ttft_ms"]["p99"]}' for r in reps)
errs = sum(r["error_total"] for r in reps)
name = {"none": "none (single-instance server)", "redis": "Redis", "postgres": "Postgres only"}[mode]
print(json.dumps({"delay_ms": int(delay), "coordination": mode, "instances": int(n), "users": int(users),
                  "streams_per_s": round(sps, 1), "errors": errs, "reports": reps}))
print(f"| {delay} | {name} | {n} | {users} | {sps:,.0f} | {ttft} | {errs} |")
EOF
)
    echo "$row" | sed -n 1p >> "$work/rows.jsonl"
    echo "$row" | sed -n 2p | tee -a "$work/table.md"
    rm -f "$work"/lg-*.json
  done
done

{
  echo "# Multi-instance load bench ($stamp)"
  echo
  echo '```'
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cell: warmup ${WARMUP}s, measured ${DURATION}s, ${TOKENS}-token answers"
  echo '```'
  echo
  echo "Example-server processes on one machine over one Postgres; with 3 instances,"
  echo "one chat-loadgen per instance runs at the same time and streams/s is their sum."
  echo "Servers, Redis, Postgres and load generators share the same CPUs."
  echo
  cat "$work/table.md"
} > "$out/processes-$stamp.md"
python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  "$work/rows.jsonl" > "$out/processes-$stamp.json"
cp "$out/processes-$stamp.md" "$out/processes-latest.md"
echo "wrote $out/processes-$stamp.md"
