#!/usr/bin/env bash
# The message contract kept by every participant, whatever its language: starts the Rust
# participants (inventory, payment, shipping) against a database and topic prefix of this run's
# own and drives each through `sagactl conformance` (payment across a SIGKILL and restart too);
# then replaces the Rust shipping service with the Python one (examples/python-shipping: its
# pinned packages from PyPI into target/python-shipping-venv on first use, as Schemathesis's),
# in the same consumer group on the same command topic, drives it through the kit across a
# restart, and runs the order saga end to end with it: an orchestrator, orders placed over
# HTTP, the ones to Germany completed and the ones to a deny-listed country (AQ) compensated.
# About a minute. Needs the broker on $KAFKA_BROKERS and PostgreSQL at $TEST_DATABASE_URL
# (scripts/test.sh starts them); drops its database and topics at the end.
#
#   scripts/conformance.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
server_url="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
run_id="$(date +%s)_$$"
database="conformance_${run_id}"
export TOPIC_PREFIX="conformance-$run_id."
export DATABASE_URL="$server_url/$database"
log_dir="$ROOT/.run/conformance-$run_id"
venv=target/python-shipping-venv
mkdir -p "$log_dir"
say() { echo "conformance: $*" >&2; }

cleanup() {
  local status=$? pidfile
  set +e
  for pidfile in "$log_dir"/*.pid; do
    [[ -e $pidfile ]] && kill -TERM "$(cat "$pidfile")" 2>/dev/null
  done
  sleep 1
  for pidfile in "$log_dir"/*.pid; do
    [[ -e $pidfile ]] && kill -KILL "$(cat "$pidfile")" 2>/dev/null
  done
  psql "$server_url/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null
  target/debug/sagactl delete-topics --prefix "$TOPIC_PREFIX" >/dev/null 2>&1
  ((status == 0)) || say "FAILED (exit $status); the services' logs: $log_dir"
  exit "$status"
}
trap cleanup EXIT

cargo build --locked --bin orchestrator --bin inventory --bin payment --bin shipping --bin sagactl
# Pinned, installed on first use (confluent-kafka's wheel carries its own librdkafka).
requirements=examples/python-shipping/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt"; then
  say "installing $(tr '\n' ' ' <"$requirements")into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
psql "$server_url/postgres" -qc "CREATE DATABASE $database"

# service NAME COMMAND...: writes $log_dir/start-NAME, which starts COMMAND in the background
# (its pid in $log_dir/NAME.pid, its output appended to NAME.log), and runs it. The kit's
# --restart runs it again after a SIGKILL.
service() {
  local name="$1"
  shift
  {
    echo "#!/bin/sh"
    echo "cd '$ROOT'"
    printf '%q ' "$@"
    echo ">>'$log_dir/$name.log' 2>&1 &"
    echo "echo \$! >'$log_dir/$name.pid'"
  } >"$log_dir/start-$name"
  chmod +x "$log_dir/start-$name"
  "$log_dir/start-$name"
}
restart() { echo "kill -KILL \$(cat '$log_dir/$1.pid') && '$log_dir/start-$1'"; }

# ready URL NAME: waits (30 s at most) until URL answers.
ready() {
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$(cat "$log_dir/$2.pid")" 2>/dev/null || { say "$2 exited"; return 1; }
    sleep 0.1
  done
  say "$2 was not ready within 30 s"
  return 1
}

declare -A metrics
for name in inventory payment shipping; do
  metrics[$name]="127.0.0.1:$(free_port)"
  service "$name" env METRICS_ADDR="${metrics[$name]}" DATABASE_MAX_CONNECTIONS=3 \
    "target/debug/$name"
done
for name in inventory payment shipping; do ready "http://${metrics[$name]}/readyz" "$name"; done

say "the kit against the Rust participants"
kit() { target/debug/sagactl conformance --participant "$@"; }
status=0
kit inventory >"$log_dir/kit-inventory.txt" 2>&1 &
inventory_kit=$!
kit shipping >"$log_dir/kit-shipping.txt" 2>&1 &
shipping_kit=$!
kit payment --restart "$(restart payment)" >"$log_dir/kit-payment.txt" 2>&1 || status=$?
wait "$inventory_kit" || status=$?
wait "$shipping_kit" || status=$?
cat "$log_dir"/kit-{inventory,payment,shipping}.txt
((status == 0)) || exit "$status"

say "the Python shipping participant in the Rust one's place"
kill -TERM "$(cat "$log_dir/shipping.pid")"
while kill -0 "$(cat "$log_dir/shipping.pid")" 2>/dev/null; do sleep 0.1; done
rm "$log_dir/shipping.pid"
service python-shipping env LEDGER_PATH="$log_dir/python-shipping.sqlite3" \
  "$venv/bin/python" examples/python-shipping/shipping.py
for _ in $(seq 1 300); do
  grep -q '^python-shipping: serving' "$log_dir/python-shipping.log" 2>/dev/null && break
  kill -0 "$(cat "$log_dir/python-shipping.pid")" 2>/dev/null || { say "python-shipping exited"; exit 1; }
  sleep 0.1
done
kit shipping --restart "$(restart python-shipping)"

say "the order saga end to end with the Python shipping participant"
http_addr="127.0.0.1:$(free_port)"
service orchestrator env HTTP_ADDR="$http_addr" API_OPEN_ON_LOOPBACK=true \
  DATABASE_MAX_CONNECTIONS=4 target/debug/orchestrator
ready "http://$http_addr/healthz" orchestrator
declare -A expected
for country in DE DE DE AQ DE AQ; do
  order_id=$(curl -fsS -H 'Content-Type: application/json' -d "{
      \"customer_id\": \"alice\", \"items\": [{\"sku\": \"WIDGET\", \"quantity\": 1, \"unit_price_cents\": 1000}],
      \"total_cents\": 1000, \"currency\": \"EUR\",
      \"shipping_address\": {\"country\": \"$country\", \"city\": \"Somewhere\", \"line1\": \"Main Street 1\", \"postal_code\": \"10117\"}}" \
    "http://$http_addr/orders" | jq -r .order_id)
  [[ $country == AQ ]] && expected[$order_id]=compensated || expected[$order_id]=completed
done
deadline=$((SECONDS + 60))
for order_id in "${!expected[@]}"; do
  while :; do
    state=$(curl -fsS "http://$http_addr/orders/$order_id/saga" 2>/dev/null | jq -r .state || true)
    [[ $state == "${expected[$order_id]}" ]] && break
    if [[ $state == failed ]] || ((SECONDS > deadline)); then
      say "order $order_id: saga ${state:-not found}, expected ${expected[$order_id]}"
      exit 1
    fi
    sleep 0.2
  done
  say "order $order_id: $state"
done
say "every order ended as expected with the Python shipping participant"
