#!/usr/bin/env bash
# The HTTP API against its OpenAPI document: starts an orchestrator of its own (debug build,
# fresh database and topic prefix, a token list with one token that holds every role, the
# open health address) against the PostgreSQL and broker that scripts/test.sh started, runs
# scripts/schemathesis.sh against it (Schemathesis from PyPI: no 5xx, every answer as the
# document says), then stops it and drops its database and topics.
#
#   scripts/api-test.sh [extra schemathesis run options]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
server_url="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
run_id="$(date +%s)_$$"
database="api_${run_id}"
log_dir=".run/api-$run_id"
mkdir -p "$log_dir"
say() { echo "api-test: $*" >&2; }

http_addr="127.0.0.1:$(free_port)"
pid=""
cleanup() {
  local status=$?
  set +e
  if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; fi
  psql "$server_url/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null
  target/debug/sagactl delete-topics --prefix "api-$run_id." >/dev/null 2>&1
  ((status == 0)) || say "FAILED (exit $status); the orchestrator's log: $log_dir/orchestrator.log"
  exit "$status"
}
trap cleanup EXIT

cargo build --locked --bin orchestrator --bin sagactl
psql "$server_url/postgres" -qc "CREATE DATABASE $database"
make_api_tokens "$log_dir/api-tokens" schemathesis:viewer,client,operator
DATABASE_URL="$server_url/$database" TOPIC_PREFIX="api-$run_id." HTTP_ADDR="$http_addr" \
  DATABASE_MAX_CONNECTIONS=2 target/debug/orchestrator >"$log_dir/orchestrator.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN_schemathesis" "http://$http_addr/healthz" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { say "the orchestrator exited"; exit 1; }
  sleep 0.1
done
# A saga of every type the definitions name, so that the list answers Schemathesis gets hold
# real rows of each shape (an order saga's view has `order_id` and `order`, a return saga's
# not). No participant runs, so both stay `running` at their first step.
api="http://$http_addr"
order_id=$(curl -fsS -H "Authorization: Bearer $TOKEN_schemathesis" -H 'Content-Type: application/json' \
  -d '{"customer_id": "alice", "items": [{"sku": "WIDGET", "quantity": 1, "unit_price_cents": 1000}],
       "total_cents": 1000, "currency": "EUR",
       "shipping_address": {"country": "DE", "city": "Berlin", "line1": "Unter den Linden 1", "postal_code": "10117"}}' \
  "$api/orders" | jq -r .order_id)
TOPIC_PREFIX="api-$run_id." target/debug/sagactl return --order-id "$order_id" >/dev/null
for _ in $(seq 1 300); do
  types=$(curl -fsS -H "Authorization: Bearer $TOKEN_schemathesis" "$api/sagas" \
    | jq -r '[.sagas[].definition_name] | unique | join(",")')
  [[ $types == "order,return" ]] && break
  sleep 0.1
done
[[ $types == "order,return" ]] || { say "the seeded sagas did not start (saw: ${types:-none})"; exit 1; }
say "Schemathesis against $api (sagas seeded: $types)"
API_URL="http://$http_addr" API_TOKEN="$TOKEN_schemathesis" scripts/schemathesis.sh "$@"
