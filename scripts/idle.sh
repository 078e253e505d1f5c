#!/usr/bin/env bash
# Measures what the whole stack costs at rest: starts it as scripts/bench.sh does (common.sh's
# bench_start_stack, the same knobs), runs a few sagas so every consumer, producer and pool is
# warm, waits IDLE_SETTLE_SECS (default 10), then reports each process's CPU over IDLE_SECS
# (default 60) as a percentage of one core: the services, the broker's JVM and PostgreSQL (the
# postmaster and every process under it), and their sum.
#
#   scripts/idle.sh            # IDLE_SECS=120 scripts/idle.sh for a steadier number
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

trap bench_stop_stack EXIT
bench_start_stack
"$BENCH_SAGACTL" load --orders 20 --in-flight 1 >/dev/null
sleep "${IDLE_SETTLE_SECS:-10}"

# The processes bench_start_stack accounts for (its `--process NAME=PID` arguments): the
# services, the broker's JVM (or the secured cluster's nodes) and the postmaster.
names=() roots=()
for k in "${!BENCH_ACCOUNTING[@]}"; do
  [[ ${BENCH_ACCOUNTING[$k]} == --process ]] || continue
  process="${BENCH_ACCOUNTING[$((k + 1))]}"
  names+=("${process%%=*}")
  roots+=("${process#*=}")
done

# ticks ROOT: user + system clock ticks of ROOT and its direct children, with those of their
# reaped children (PostgreSQL's backends are the postmaster's children: one that ended during
# the window, a connection closed, moves its ticks into the postmaster's, as sagactl's
# accounting reads them too).
ticks() {
  local total=0 pid fields
  for pid in "$1" $(pgrep -P "$1" || true); do
    fields="$(cut -d')' -f2- "/proc/$pid/stat" 2>/dev/null)" || continue
    set -- $fields
    total=$((total + ${12} + ${13} + ${14} + ${15}))
  done
  echo "$total"
}

secs="${IDLE_SECS:-60}"
before=()
for k in "${!roots[@]}"; do before+=("$(ticks "${roots[$k]}")"); done
sleep "$secs"
hz="$(getconf CLK_TCK)"
sum=0
echo "idle over ${secs} s, CPU as % of one core:"
for k in "${!roots[@]}"; do
  used=$(($(ticks "${roots[$k]}") - ${before[$k]}))
  sum=$((sum + used))
  awk -v n="${names[$k]}" -v t="$used" -v hz="$hz" -v s="$secs" 'BEGIN { printf "  %-14s %5.2f%%\n", n, 100 * t / hz / s }'
done
awk -v t="$sum" -v hz="$hz" -v s="$secs" 'BEGIN { printf "  %-14s %5.2f%%\n", "all", 100 * t / hz / s }'
