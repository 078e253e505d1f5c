#!/usr/bin/env bash
# The HTTP API against its OpenAPI document: starts an orchestrator of its own (debug build,
# fresh database and topic prefix, a token list with one token that holds every role, the
# open health address) against the PostgreSQL and broker that scripts/test.sh started, serving
# HTTPS with a certificate from a CA of this run's own (scripts/pki.sh), runs
# scripts/schemathesis.sh against it (Schemathesis from PyPI, trusting that CA: no 5xx, every
# answer as the document says), then Python's `requests` (from Schemathesis's virtualenv) as
# an HTTPS client nobody here wrote: with the CA it reads the API and gets
# Strict-Transport-Security, without it the certificate is refused; then it stops the
# orchestrator and drops its database and topics.
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
pki="$log_dir/pki"
cert="$(PKI_DIR="$pki" scripts/pki.sh issue api)"
ca="$pki/ca.crt"
api="https://$http_addr"
DATABASE_URL="$server_url/$database" TOPIC_PREFIX="api-$run_id." HTTP_ADDR="$http_addr" \
  HTTP_TLS_CERT_FILE="$cert" HTTP_TLS_KEY_FILE="$pki/api.key" \
  DATABASE_MAX_CONNECTIONS=2 target/debug/orchestrator >"$log_dir/orchestrator.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  curl -fsS --cacert "$ca" -o /dev/null -H "Authorization: Bearer $TOKEN_schemathesis" "$api/healthz" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { say "the orchestrator exited"; exit 1; }
  sleep 0.1
done
# A saga of every type the definitions name, so that the list answers Schemathesis gets hold
# real rows of each shape (an order saga's view has `order_id` and `order`, a return saga's
# not). No participant runs, so both stay `running` at their first step.
order_id=$(curl -fsS --cacert "$ca" -H "Authorization: Bearer $TOKEN_schemathesis" -H 'Content-Type: application/json' \
  -d '{"customer_id": "alice", "items": [{"sku": "WIDGET", "quantity": 1, "unit_price_cents": 1000}],
       "total_cents": 1000, "currency": "EUR",
       "shipping_address": {"country": "DE", "city": "Berlin", "line1": "Unter den Linden 1", "postal_code": "10117"}}' \
  "$api/orders" | jq -r .order_id)
TOPIC_PREFIX="api-$run_id." target/debug/sagactl return --order-id "$order_id" >/dev/null
for _ in $(seq 1 300); do
  types=$(curl -fsS --cacert "$ca" -H "Authorization: Bearer $TOKEN_schemathesis" "$api/sagas" \
    | jq -r '[.sagas[].definition_name] | unique | join(",")')
  [[ $types == "order,return" ]] && break
  sleep 0.1
done
[[ $types == "order,return" ]] || { say "the seeded sagas did not start (saw: ${types:-none})"; exit 1; }
say "Schemathesis against $api (sagas seeded: $types)"
API_URL="$api" API_TOKEN="$TOKEN_schemathesis" scripts/schemathesis.sh --tls-verify "$ca" "$@"

say "Python requests against $api"
API_URL="$api" API_CA="$ca" API_TOKEN="$TOKEN_schemathesis" target/schemathesis-venv/bin/python - <<'PYTHON'
import os
import sys

import requests

api, ca, token = os.environ["API_URL"], os.environ["API_CA"], os.environ["API_TOKEN"]
answer = requests.get(f"{api}/sagas", headers={"Authorization": f"Bearer {token}"}, verify=ca, timeout=10)
hsts = answer.headers.get("Strict-Transport-Security", "")
if answer.status_code != 200 or not answer.json().get("sagas") or not hsts.startswith("max-age="):
    sys.exit(f"requests with the CA: {answer.status_code}, HSTS {hsts!r}, {answer.text[:200]}")
try:
    requests.get(f"{api}/healthz", timeout=10)
    sys.exit("requests trusted the API's certificate without its CA")
except requests.exceptions.SSLError as refused:
    print(f"requests: 200 with the CA (Strict-Transport-Security: {hsts}); without it: {type(refused).__name__}")
PYTHON
