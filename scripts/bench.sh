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
# BENCH_INSTANCES=N runs N instances of the orchestrator and of each participant (same database,
# topic prefix and consumer groups; each its own process and ports), to measure 1 against 2.
# The report includes each process's CPU time per saga and peak memory (--process), and from
# each one's /metrics its outbox backlog and consumer lag at the end and the work it did: the
# records it consumed, their share of its service's and the partitions they came from, the
# outbox rows it published and the deadlines it fired (the "work" lines).
# The deployment is started by common.sh's bench_start_stack (its other knobs are listed there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

trap bench_stop_stack EXIT
bench_start_stack
if (($# == 0)); then set -- --orders 300 --in-flight 1; fi
"$BENCH_SAGACTL" load "${BENCH_ACCOUNTING[@]}" --delete-topics "$@"
