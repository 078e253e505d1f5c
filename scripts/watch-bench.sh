#!/usr/bin/env bash
# Does watching the engine slow the sagas down? Starts the benchmark deployment as bench.sh
# does (release build, fresh database and topic prefix; common.sh's bench_start_stack) with
# bearer-token auth on the orchestrator's API, leaves WATCH_SETUP_ORDERS sagas `failed` to be
# watched, then runs `sagactl load` WATCH_PAIRS times without watchers and with them, in turn:
# `sagactl watchers` keeping WATCH_STREAMS watch streams open on the failed sagas and
# emulating WATCH_TABS operations pages (/stats every second, the saga list every 2 s, one
# watch stream each) for the whole run. Every run's JSON and text go to RESULTS_DIR, with one
# summary line per run and the comparison in RESULTS_DIR/summary.txt.
#
#   scripts/watch-bench.sh RESULTS_DIR [sagactl load arguments of each measured run]
#
# The default load is an open loop that leaves the two cores headroom (bench.sh measured
# 100/s at about 90% CPU): --orders 3000 --rate 50 --failure-percent 30, 60 s.
#
# WATCH_PAIRS (2), WATCH_STREAMS (1000), WATCH_TABS (20), WATCH_SETUP_ORDERS (1000),
# WATCH_WARMUP_SECS (15: the watchers open their streams, over 5 s, and settle before the
# load starts), WATCH_PAUSE_SECS (5, between runs). OPS_HTTP_ADDR (default 127.0.0.1:18081)
# is where the orchestrator serves /healthz and /metrics without a token, for the load's
# accounting. BENCH_PROFILE, BENCH_SERVICES_DIR, HTTP_ADDR, BENCH_METRICS_PORT_BASE as for
# bench.sh.
#
# How the setup leaves sagas failed: its orders all have their payment declined (`sagactl load
# --failure-percent 100 --fail-at payment`), so each saga's one compensation is a stock release;
# the inventory participant runs with FAULT_COMPENSATION_FAILURES=WATCH_SETUP_ORDERS and refuses
# exactly those releases, and the orchestrator with COMPENSATION_MAX_ATTEMPTS=1 fails a saga at
# its first refusal. The measured runs' compensations then succeed. A failed saga's watch
# stream stays open (an operator can still move it; issue 12's API), so the streams stay open
# for the whole run; an orchestrator from before issue 12 ends them, and the watchers then
# reopen them every second or so (which the report shows as "ended by the server").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if (($# < 1)); then
  echo "usage: $0 RESULTS_DIR [sagactl load arguments]" >&2
  exit 2
fi
mkdir -p "$1"
results="$(cd "$1" && pwd)"
shift
cd "$ROOT"
load_args=("$@")
((${#load_args[@]})) || load_args=(--orders 3000 --rate 50 --failure-percent 30)
pairs="${WATCH_PAIRS:-2}"
streams="${WATCH_STREAMS:-1000}"
tabs="${WATCH_TABS:-20}"
setup_orders="${WATCH_SETUP_ORDERS:-1000}"
warmup_secs="${WATCH_WARMUP_SECS:-15}"
pause_secs="${WATCH_PAUSE_SECS:-5}"
export OPS_HTTP_ADDR="${OPS_HTTP_ADDR:-127.0.0.1:18081}"

# Every stream is a socket in sagactl and one in the orchestrator, which inherit this limit.
need_files=$((streams + 3 * tabs + 1024))
if [[ "$(ulimit -n)" != unlimited ]] && (($(ulimit -n) < need_files)); then
  if ! ulimit -n "$need_files" 2>/dev/null; then
    echo "cannot raise the open-files limit to $need_files (hard limit $(ulimit -Hn))" >&2
    exit 1
  fi
fi

# One viewer token, random, known only to this run; the orchestrator gets its sha256.
tokens_file="$(mktemp)"
make_api_tokens "$tokens_file" watch-bench:viewer
export SAGA_API_TOKEN="$TOKEN_watch_bench"

# Thousands of streams share the one token: the per-token rate limit and stream cap would refuse
# most of them.
BENCH_ENV_orchestrator=(COMPENSATION_MAX_ATTEMPTS=1 API_RATE_LIMIT_PER_SEC=0
  WATCH_MAX_STREAMS_PER_TOKEN="$((streams + 3 * tabs))")
BENCH_ENV_inventory=(FAULT_COMPENSATION_FAILURES="$setup_orders")

watchers_pid=""
stop_watchers() {
  if [[ -n "$watchers_pid" ]]; then
    kill -TERM "$watchers_pid" 2>/dev/null || true
    wait "$watchers_pid" || echo "sagactl watchers exited with status $?" >&2
    watchers_pid=""
  fi
}
cleanup() {
  stop_watchers
  bench_stop_stack
  rm -f "$tokens_file"
}
trap cleanup EXIT

bench_start_stack
api="http://$HTTP_ADDR"
stats() {
  curl -fsS --max-time 10 -H "Authorization: Bearer $SAGA_API_TOKEN" "$api/stats"
}

summary() {
  echo "$*" | tee -a "$results/summary.txt"
}
: >"$results/summary.txt"
summary "watch-bench $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
  "profile ${BENCH_PROFILE:-release}, load: ${load_args[*]}; watchers: $streams streams, $tabs tabs"

echo "setup: $setup_orders orders whose payment is declined, each saga failing at its stock release" >&2
"$BENCH_SAGACTL" load --orders "$setup_orders" --failure-percent 100 --fail-at payment \
  --in-flight 50 --warmup-secs 0 --json "$results/setup.json" >"$results/setup.txt"
failed="$(stats | jq '.counts.failed')"
summary "setup: $failed sagas failed (of $setup_orders orders)"
if ((failed < setup_orders)); then
  echo "the setup left $failed failed sagas, not $setup_orders; the streams share those" >&2
fi

# run_load NAME [more sagactl load arguments]: one measured run, its JSON in NAME.json.
run_load() {
  local name="$1"
  shift
  "$BENCH_SAGACTL" load "${BENCH_ACCOUNTING[@]}" "$@" "${load_args[@]}" \
    --json "$results/$name.json" | tee "$results/$name.txt"
}

run_line() {
  jq -r --arg name "$1" '"\($name): p50 \(.latency_ms.p50*10|round/10) ms, p90 \(.latency_ms.p90*10|round/10) ms, p99 \(.latency_ms.p99*10|round/10) ms, max \(.latency_ms.max|round) ms; \(.finished_per_sec*10|round/10) finished/s, unfinished \(.unfinished)"' "$results/$1.json"
}

watchers_line() {
  jq -r '"  watchers: streams open at end \(.streams.open_at_end)/\(.streams.wanted) (min \(.streams.min_open // "-") after the ramp), opens \(.streams.opens), 429s \(.streams.too_many_streams), ended by the server \(.streams.ended_by_server), errors \([.streams.errors[].count] | add // 0), events \(.streams.events_total); tabs: \(.tabs.requests) requests, p50 \(.tabs.latency_ms.p50*10|round/10) ms, p99 \(.tabs.latency_ms.p99*10|round/10) ms, errors \([.tabs.stats.errors[].count, .tabs.list.errors[].count, .tabs.watch.errors[].count] | add // 0), tab streams open \(.tabs.watch.open_at_end)/\(.tabs.watch.wanted)"' "$1"
}

without_runs=()
with_runs=()
for pair in $(seq 1 "$pairs"); do
  last=()
  ((pair < pairs)) || last=(--delete-topics)

  sleep "$pause_secs"
  echo "run $pair without watchers" >&2
  run_load "$pair-without"
  summary "$(run_line "$pair-without")"
  without_runs+=("$results/$pair-without.json")

  sleep "$pause_secs"
  echo "run $pair with $streams watch streams and $tabs tabs" >&2
  "$BENCH_SAGACTL" watchers --api "$api" --streams "$streams" --tabs "$tabs" --saga-state failed \
    --json "$results/$pair-with-watchers.json" \
    >"$results/$pair-with-watchers.txt" 2>"$results/$pair-with-watchers.log" &
  watchers_pid=$!
  sleep "$warmup_secs"
  if ! kill -0 "$watchers_pid" 2>/dev/null; then
    cat "$results/$pair-with-watchers.log" >&2
    wait "$watchers_pid" || true
    watchers_pid=""
    echo "sagactl watchers stopped before the load started" >&2
    exit 1
  fi
  tail -n 1 "$results/$pair-with-watchers.log" >&2
  run_load "$pair-with" --process "watchers=$watchers_pid" "${last[@]}"
  stop_watchers
  cat "$results/$pair-with-watchers.txt"
  summary "$(run_line "$pair-with")"
  with_runs+=("$results/$pair-with.json")
  summary "$(watchers_line "$results/$pair-with-watchers.json")"
done

# The means of each kind of run, and with against without.
compare() {
  local quantile="$1" without with
  without="$(jq -s "map(.latency_ms.$quantile) | add / length" "${without_runs[@]}")"
  with="$(jq -s "map(.latency_ms.$quantile) | add / length" "${with_runs[@]}")"
  awk -v q="$quantile" -v a="$without" -v b="$with" 'BEGIN {
    change = (b / a - 1) * 100
    printf "%s: without watchers %.1f ms, with %.1f ms (%+.1f%%): %s\n", q, a, b, change,
      (change <= 10 ? "within 10%" : "MORE than 10% slower")
  }'
}
summary "mean over $pairs runs each"
summary "$(compare p50)"
summary "$(compare p99)"
echo "results in $results" >&2
