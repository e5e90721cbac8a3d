# Sourced by run-matrix.sh and compare.sh: one load-bench cell run against a
# freshly started server (and, on Postgres, a fresh database).
#
# Callers set LOADGEN, CEILING_BIN, PG_ADMIN_URL and CELL_WORK (a scratch
# directory for the SQLite file), and call bench_env DELAY_MS first.

# The example server's and the ceiling's settings for a cell.
bench_env() {
  export PORT=0 BIND=127.0.0.1 TOKENS=64 TOKEN_DELAY_MS=$1 RUST_LOG=${RUST_LOG:-warn}
  export AUTH=dev-header MODEL=demo SHUTDOWN_GRACE_MS=1000
}

# run_cell TARGET SERVER_BIN LOADGEN_ARGS...: TARGET is ceiling, sqlite or
# postgres; the load generator starts the server (SERVER_BIN is not used for
# the ceiling). Returns the load generator's status; its stdout goes to
# /dev/null (the report is its --json file).
run_cell() {
  local target=$1 server=$2 status=0 db
  shift 2
  case $target in
    ceiling)
      "$LOADGEN" "$@" -- "$CEILING_BIN" >/dev/null || status=$?
      ;;
    sqlite)
      rm -f "$CELL_WORK"/bench.db*
      DATABASE_URL="sqlite://$CELL_WORK/bench.db" "$LOADGEN" "$@" -- "$server" >/dev/null || status=$?
      ;;
    postgres)
      db="bench_$(date -u +%Y%m%dt%H%M%S)_$$_$RANDOM"
      psql -q "$PG_ADMIN_URL/postgres" -c "CREATE DATABASE $db" >/dev/null
      DATABASE_URL="$PG_ADMIN_URL/$db" "$LOADGEN" "$@" -- "$server" >/dev/null || status=$?
      psql -q "$PG_ADMIN_URL/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
      ;;
    *)
      echo "unknown target $target" >&2
      return 2
      ;;
  esac
  return $status
}
