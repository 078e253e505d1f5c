#!/usr/bin/env bash
# Alternating before/after pairs, same machine, same hour.
set -u
out=/work/main/bench-results/wedge20
for round in 1 2; do
  for load in "1 500" "256 7680"; do
    set -- $load
    for side in before after; do
      dir=/work/wt/before; [[ $side == after ]] && dir=/work/main
      echo "== round $round, $side, $1 in flight, $(date -u +%T)"
      (cd $dir && scripts/bench.sh --orders $2 --in-flight $1 --failure-percent 30 \
        --json $out/$side-inflight$1-round$round.json) > $out/$side-inflight$1-round$round.log 2>&1
      echo "rc=$?"
    done
  done
done
