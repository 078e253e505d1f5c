#!/usr/bin/env bash
# Measures end-to-end saga latency and throughput on this machine: builds release binaries,
# starts PostgreSQL and the broker if needed, a fresh database and topic prefix, the orchestrator and the three
# participants as separate processes, then runs `sagactl load` with the arguments given
# (default: 300 orders, one in flight). Removes its database afterwards.
#
#   scripts/bench.sh [sagactl load arguments, e.g. --orders 2000 --in-flight 8 --json out.json]
#
# BENCH_PROFILE=debug uses the debug build (CI's smoke run); the default is release.
# BENCH_SERVICES_DIR runs the services from another build (e.g. an older commit's
# target/release, to measure before and after a change with the same load generator).
# The report includes each service's CPU time per saga and peak memory (--process) and its
# outbox backlog and consumer lag at the end (--metrics), read from the services' /metrics.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
server_url="${BENCH_DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}"
# BENCH_DATABASE_OPTIONS, e.g. "?host=/var/run/postgresql": PostgreSQL over its Unix socket.
url_options="${BENCH_DATABASE_OPTIONS:-}"
run_id="$(date +%s)"
database="bench_${run_id}"
export TOPIC_PREFIX="bench-${run_id}."
export DATABASE_URL="$server_url/$database$url_options"
export HTTP_ADDR="${HTTP_ADDR:-127.0.0.1:18080}"
# A local benchmark: the API runs open, on loopback only (sagactl load reads its /metrics).
export API_OPEN_ON_LOOPBACK=true

start_dependencies
profile="${BENCH_PROFILE:-release}"
if [[ "$profile" == release ]]; then
  cargo build --release --locked --bins
else
  cargo build --locked --bins
fi
psql "$server_url/postgres$url_options" -qc "CREATE DATABASE $database"

mkdir -p ".run/bench-$run_id"
pids=()
cleanup() {
  if ((${#pids[@]})); then kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; fi
  psql "$server_url/postgres$url_options" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" || true
}
trap cleanup EXIT
for service in orchestrator inventory payment shipping; do
  "${BENCH_SERVICES_DIR:-target/$profile}/$service" >".run/bench-$run_id/$service.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 300); do
  curl -fsS "http://$HTTP_ADDR/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
# Wait for the participants' migrations (the demo data is their last one).
for _ in $(seq 1 300); do
  psql "$DATABASE_URL" -Atc "SELECT EXISTS (SELECT 1 FROM inventory.stock) AND EXISTS (SELECT 1 FROM payment.accounts) AND to_regclass('shipping.shipments') IS NOT NULL" 2>/dev/null | grep -q t && break
  sleep 0.1
done

if (($# == 0)); then set -- --orders 300 --in-flight 1; fi
names=(orchestrator inventory payment shipping)
metrics_urls=("http://$HTTP_ADDR/metrics" http://127.0.0.1:9181/metrics http://127.0.0.1:9182/metrics http://127.0.0.1:9183/metrics)
accounting=()
for i in "${!names[@]}"; do
  accounting+=(--process "${names[$i]}=${pids[$i]}" --metrics "${names[$i]}=${metrics_urls[$i]}")
done
# The broker and PostgreSQL (the postmaster and every backend under it) share the machine;
# their CPU counts in the per-saga budget too.
broker_pid_file="$ROOT/.run/broker/broker.pid"
if [[ -f "$broker_pid_file" ]] && kill -0 "$(cat "$broker_pid_file")" 2>/dev/null; then
  accounting+=(--process "broker=$(cat "$broker_pid_file")" --kafka-log-dir "$ROOT/.run/broker/data")
fi
postmaster_pid="$(head -1 /var/run/postgresql/*-main.pid 2>/dev/null || true)"
if [[ -n "$postmaster_pid" ]]; then
  accounting+=(--process "postgres=$postmaster_pid")
fi
"target/$profile/sagactl" load "${accounting[@]}" --sql-stats "$DATABASE_URL" --delete-topics "$@"
