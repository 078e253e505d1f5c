#!/usr/bin/env bash
# How big the orchestrator's tables are after N finished sagas, and how fast retention removes
# them: creates a scratch database with the orchestrator's schema, fills it with N finished
# sagas (4 history lines and 3 inbox rows each, shaped like real ones), prints the table sizes,
# then runs the real orchestrator binary with zero retention and times its sweep until the
# tables are empty, and prints the sizes again after VACUUM. Removes the database afterwards.
#
#   scripts/retention-bench.sh [N]     # default 1000000
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
n="${1:-1000000}"
server_url="${BENCH_DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}"
run_id="$(date +%s)"
database="retention_${run_id}"
db="$server_url/$database"
profile="${BENCH_PROFILE:-release}"

start_dependencies
if [[ "$profile" == release ]]; then cargo build --release --locked --bin orchestrator; else cargo build --locked --bin orchestrator; fi
psql "$server_url/postgres" -qc "CREATE DATABASE $database"
pid=""
cleanup() {
  if [[ -n "$pid" ]]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  psql "$server_url/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" || true
}
trap cleanup EXIT

# The orchestrator creates and migrates its schema; start it once for that, then stop it.
start_orchestrator() {
  DATABASE_URL="$db" TOPIC_PREFIX="retention-${run_id}." HTTP_ADDR=127.0.0.1:18090 \
    "target/$profile/orchestrator" >>".run/retention-${run_id}.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -fsS http://127.0.0.1:18090/healthz >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "the orchestrator did not start; see .run/retention-${run_id}.log" >&2
  exit 1
}
mkdir -p .run
start_orchestrator
kill -TERM "$pid"; wait "$pid" || true; pid=""

sizes() {
  psql "$db" -At -F ' ' -c "SELECT relname, pg_size_pretty(pg_total_relation_size(c.oid)), \
      (SELECT reltuples::bigint FROM pg_class WHERE oid = c.oid) \
    FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace \
    WHERE nspname = 'orchestrator' AND relkind = 'r' ORDER BY relname" |
    awk '{printf "  %-14s %10s %s (rows, estimated %s)\n", $1, $2, $3, $4}'
  psql "$db" -At -c "SELECT 'total: ' || pg_size_pretty(sum(pg_total_relation_size(c.oid))) \
    FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace \
    WHERE nspname = 'orchestrator' AND relkind = 'r'" | sed 's/^/  /'
}

echo "filling $n finished sagas..." >&2
started=$(date +%s.%N)
psql "$db" -q -v ON_ERROR_STOP=1 <<SQL
SET search_path = orchestrator;
INSERT INTO sagas (id, saga_key, state, order_data, steps, failure_reason, definition_version,
                   version, created_at, updated_at, finished_at, deadline_at, current_step, trace_parent)
SELECT gen_random_uuid(), gen_random_uuid()::text, 'completed',
  jsonb_build_object('order_id', gen_random_uuid(), 'customer_id', 'alice', 'currency', 'EUR',
    'total_cents', 1000,
    'items', jsonb_build_array(jsonb_build_object('sku', 'WIDGET', 'quantity', 1, 'unit_price_cents', 1000)),
    'shipping_address', jsonb_build_object('country', 'DE', 'city', 'Berlin', 'line1', 'Unter den Linden 1', 'postal_code', '10117')),
  (SELECT jsonb_agg(jsonb_build_object('name', step, 'status', 'succeeded', 'attempts', 1,
      'compensation_attempts', 0, 'compensation_budget_from', 0,
      'started_at', now(), 'finished_at', now(), 'compensation_started_at', null,
      'compensated_at', null, 'failure_reason', null))
   FROM unnest(ARRAY['reserve_stock', 'charge_payment', 'schedule_shipment']) AS step),
  NULL, 1, 6, now() - interval '2 days', now() - interval '2 days', now() - interval '2 days',
  NULL, NULL, '00-' || md5(i::text) || '-' || substr(md5((i + 1)::text), 1, 16) || '-01'
FROM generate_series(1, $n) AS i;
INSERT INTO saga_history (saga_id, at, message_id, message_type, decision, detail, state_after)
SELECT s.id, s.created_at, CASE WHEN k = 0 THEN NULL ELSE gen_random_uuid() END,
  (ARRAY['OrderPlaced', 'StockReserved', 'PaymentCharged', 'ShipmentScheduled'])[k + 1],
  CASE WHEN k = 0 THEN 'started' ELSE 'applied' END,
  CASE WHEN k = 0 THEN NULL ELSE 'step attempt 1' END,
  CASE WHEN k = 3 THEN 'completed' ELSE 'running' END
FROM sagas s CROSS JOIN generate_series(0, 3) AS k;
INSERT INTO inbox (message_id, received_at)
SELECT gen_random_uuid(), now() - interval '2 days' FROM generate_series(1, 3 * $n);
ANALYZE;
SQL
echo "filled in $(awk "BEGIN { print $(date +%s.%N) - $started }") s" >&2
echo "after $n finished sagas (no retention):"
sizes

echo "sweeping with SAGA_RETENTION_SECS=0 INBOX_RETENTION_SECS=0..." >&2
started=$(date +%s.%N)
SAGA_RETENTION_SECS=0 INBOX_RETENTION_SECS=0 RETENTION_SWEEP_INTERVAL_MS=100 start_orchestrator
while :; do
  left=$(psql "$db" -At -c "SELECT (SELECT count(*) FROM orchestrator.sagas) + (SELECT count(*) FROM orchestrator.inbox)")
  [[ "$left" == 0 ]] && break
  kill -0 "$pid" 2>/dev/null || { echo "the orchestrator exited; see .run/retention-${run_id}.log" >&2; exit 1; }
  sleep 1
done
elapsed=$(awk "BEGIN { print $(date +%s.%N) - $started }")
printf 'swept %s sagas, %s history lines and %s inbox rows in %.1f s (%.0f sagas/s)\n' \
  "$n" "$((4 * n))" "$((3 * n))" "$elapsed" "$(awk "BEGIN { print $n / $elapsed }")"
psql "$db" -q -c "VACUUM orchestrator.sagas, orchestrator.saga_history, orchestrator.inbox"
echo "after the sweep and VACUUM (space is reused by new rows; VACUUM FULL would return it to the OS):"
sizes
