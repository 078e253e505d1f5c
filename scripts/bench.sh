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
# The deployment is started by common.sh's bench_start_stack (its other knobs are listed there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

trap bench_stop_stack EXIT
bench_start_stack
if (($# == 0)); then set -- --orders 300 --in-flight 1; fi
"$BENCH_SAGACTL" load "${BENCH_ACCOUNTING[@]}" --delete-topics "$@"
