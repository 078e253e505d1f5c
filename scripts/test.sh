#!/usr/bin/env bash
# Runs the whole test suite: unit tests, golden files, the end-to-end tests, a short chaos run
# (services as processes, SIGKILLed at random while sagas run, the broker and PostgreSQL
# restarted, garbage on every consumed topic), the fuzzers briefly, the operations page in
# headless Chromium, Schemathesis against the HTTP API, the conformance kit against every
# participant (a Python one among them), the README's walkthroughs on a copy of
# the repository, and a few-second smoke run of the benchmark, against Apache Kafka on
# $KAFKA_BROKERS (default 127.0.0.1:9092) and PostgreSQL at $TEST_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432). Both are installed and started here when nothing answers
# there (scripts/broker.sh, scripts/postgres.sh); the broker is stopped again at the end. The
# security tests run against the secured three-node cluster (BROKER_NODES=3 scripts/broker.sh),
# started for them and stopped after them. The time each phase took is printed at the end.
#
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
# Every broker and Kafka tool this suite starts (scripts/broker.sh, the tests' private brokers)
# compiles with C1 only: they live minutes at a few hundred records a second, where C2's
# compilation costs more CPU than its code saves. Measured on one broker: 2.6 s of CPU to start
# instead of 4.6, and 1.1 s instead of 1.6 for its next 20 s idle. (scripts/bench.sh does not
# set it: a benchmark's broker runs hot.)
export KAFKA_JVM_EXTRA_OPTS="${KAFKA_JVM_EXTRA_OPTS:--XX:TieredStopAtLevel=1}"

# Each phase's wall time, printed at the end (also after a failure): where the suite's time goes.
phase_times=()
phase_name="PostgreSQL and the broker"
phase_started=$SECONDS
phase() {
  phase_times+=("$(printf '%5d s  %s' "$((SECONDS - phase_started))" "$phase_name")")
  phase_name="$1"
  phase_started=$SECONDS
  echo "test.sh: $1" >&2
}

start_dependencies
# The network tests (sagactl/src/chaos/network/) make namespaces, links and packet rules: root,
# with these.
ensure_commands ip:iproute2 nft:nftables iptables:iptables
STARTED_CLUSTER=0
# What runs in the background (see below) and is stopped when the suite ends early: the
# fuzzers, the API test and the walkthroughs. (The cluster's shutdown, also in the background, is waited
# for.)
background=()
cleanup() {
  local pid
  for pid in "${background[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ $STARTED_BROKER == 1 ]]; then BROKER_ADDR="$KAFKA_BROKERS" scripts/broker.sh stop; fi
  if [[ $STARTED_CLUSTER == 1 ]]; then BROKER_NODES=3 scripts/broker.sh stop; fi
  phase "done"
  echo "test.sh: wall time per phase (total $SECONDS s):" >&2
  printf '%s\n' "${phase_times[@]}" >&2
}
trap cleanup EXIT

# finish NAME PID LOG: waits for a background test, prints its log, fails with it.
finish() {
  local status=0
  wait "$2" || status=$?
  cat "$3" >&2
  if ((status != 0)); then
    echo "test.sh: $1 failed (exit $status)" >&2
    exit "$status"
  fi
}

# Each end-to-end test runs four services with small pools; four at a time stay well inside
# the 300 connections scripts/postgres.sh allows. (Eight at a time took 76 s instead of 94 but
# made the timing of the private-broker tests flaky.)
phase "the workspace's tests"
cargo test --workspace --locked --no-run "$@"

# The fuzzers, briefly: every cargo-fuzz target (each decoder, and the orchestrator's record ->
# state machine path) for 20 s from the committed corpus; any crash fails the suite. Long runs:
# scripts/fuzz.sh 840 (see its header). The instrumented build (about 210 s of CPU) and the
# runs go in the background at the lowest CPU priority once the tests are compiled, and are
# waited for at the very end: they take the CPU the other phases leave idle (most of them wait
# on a broker, a timer or a browser; started with the compilation, the build made this phase
# 262 s instead of 214). At that priority a run gets fewer executions in its 20 s than on an
# idle machine; the committed corpus is replayed whole all the same. Four run at a time: they
# end the suite, and a run lasts its 20 s however many share the cores (the slowest replay of a
# corpus, orchestrator_records', takes longer). Their output: target/artifacts/fuzz.log.
mkdir -p target/artifacts
set -m # each background job in a process group of its own, which cleanup can stop whole
(nice -n 19 scripts/fuzz.sh --build && FUZZ_JOBS=4 nice -n 19 scripts/fuzz.sh 20) >target/artifacts/fuzz.log 2>&1 &
fuzz=$!
background+=("$fuzz")
set +m

cargo test --workspace --locked "$@" -- --test-threads=4

# The secured three-node cluster (TLS, SASL, mutual TLS, ACLs, replication 3; started here
# unless it runs, about 15 s, and stopped after the security tests): the chaos suite on it, then the security
# tests
# (sagactl/tests/secured_kafka.rs, ignored without SECURED_KAFKA_DIR) provision a topic prefix
# of their own, check what each identity may not do and every way of authenticating, and run
# every service (this build's binaries) with its own identity through an order (about 25 s).
phase "the three-node cluster"
# A no-op after the tests' build (messaging/Cargo.toml: the same features for both).
cargo build --workspace --locked --bins
if ! BROKER_NODES=3 scripts/broker.sh running; then
  BROKER_NODES=3 scripts/broker.sh start
  STARTED_CLUSTER=1
fi
# The chaos suite on the secured three-node cluster (about 2 minutes; BROKER_NODES=3
# scripts/broker.sh: TLS, SCRAM, ACLs, replication 3, min.insync.replicas 2): the run's topics and
# ACLs made by the admin step, each service as its own identity (no right to create topics), the
# run itself as admin. 300 sagas over 60 s, a service SIGKILLed every 3 s, one node SIGKILLed at a
# time and started again (the leader of the busiest partitions, then the active controller, each
# once every replica is in sync), then two nodes at once for 8 s (producers wait: min ISR 2),
# and every invariant checked as on one node. KIP-848 groups: a classic group's static members
# are fenced (FENCED_INSTANCE_ID, fatal) when their coordinator's node dies.
# It runs before the security tests: they delete SCRAM credentials, and on Kafka 4.1.1 a node
# restarted after a deletion refused every SCRAM login (BENCHMARKS.md, issue 21's notes). A node
# this run kills is started again before it ends.
phase "chaos on the three-node cluster"
# The HTTP API against its OpenAPI document meanwhile, in the background: Schemathesis (from PyPI,
# pinned, installed on first use) sends generated requests to an orchestrator of its own (its
# own database and topic prefix on the one-node broker, which nothing else here uses now), with
# a token of every role, and fails on any 5xx or any answer the document does not allow (about
# two minutes). It ends before the chaos run on one node, which restarts that broker and
# PostgreSQL.
set -m
scripts/api-test.sh >target/artifacts/api-test.log 2>&1 &
api_test=$!
background+=("$api_test")
set +m
(
  source "$ROOT/.run/cluster/cluster.env"
  target/debug/sagactl chaos --kafka-brokers "$KAFKA_BROKERS" \
    --kafka-client-properties "$KAFKA_CLUSTER_DIR/clients/admin.properties" \
    --kafka-identities "$KAFKA_CLUSTER_DIR/clients" --broker-cluster-dir "$KAFKA_CLUSTER_DIR" \
    --database-server "$TEST_DATABASE_URL" --sagas 300 --rate 5 --kill-every-ms 3000 \
    --group-protocol consumer --broker-nodes 3 --broker-kill-every-ms 3000 --broker-down-ms 1000 \
    --broker-two-down-after 2 --broker-two-down-ms 8000 --settle-timeout-secs 120
)

phase "the security tests"
SECURED_KAFKA_DIR="$ROOT/.run/cluster" cargo test -p sagactl --locked --test secured_kafka -- \
  --ignored --test-threads=2
# Their topics (prefix secured-*), so that runs do not pile up partitions on the cluster.
(source .run/cluster/cluster.env && target/debug/sagactl delete-topics --prefix secured- \
  --kafka-brokers "$KAFKA_BROKERS" --kafka-client-properties .run/cluster/clients/admin.properties)
# Nothing else needs the cluster: a cluster started here shuts down (a minute: each node waits
# for the others) in the background.
if [[ $STARTED_CLUSTER == 1 ]]; then
  BROKER_NODES=3 scripts/broker.sh stop >/dev/null 2>&1 &
  STARTED_CLUSTER=0
fi

phase "what is left of Schemathesis"
finish Schemathesis "$api_test" target/artifacts/api-test.log

# The message contract, kept in any language (about a minute): `sagactl conformance` drives the
# Rust participants and the Python shipping participant (examples/python-shipping, its packages
# from PyPI into target/python-shipping-venv on first use) through every rule by their topics
# alone, each across a restart where the script says so, then the order saga runs end to end
# with the Python one in the Rust shipping service's place (scripts/conformance.sh). It runs on
# the one-node broker before the chaos run there restarts it.
phase "the conformance kit and the Python participant"
scripts/conformance.sh

# The chaos suite, short (about 2 minutes; 90 s more when something wedges): 600 sagas over
# 30 s, a SIGKILL every 1.5 s, a crash right after every 40th committed message, the broker
# SIGKILLed and restarted 10 s into each half, PostgreSQL stopped (fast: every client
# disconnected) every 6 s for about 2 s and turned read-only every 7 s for 2 s, one command
# topic deleted and created again every 12 s, and in the second half a garbage record every
# 100 ms on each consumed topic in turn. It prints each
# invariant with PASS/FAIL (among them: the dead-letter topic holds every garbage record exactly
# once; the throughput with garbage is at least half the first half's) and exits non-zero on
# any violation. The PostgreSQL restarts hit every client of the server: nothing else may use
# it meanwhile.
phase "chaos on one node"
cargo build --workspace --locked --bins
target/debug/sagactl chaos --database-server "$TEST_DATABASE_URL" --sagas 600 --rate 20 \
  --kill-every-ms 1500 --crash-after-commit-every 40 --broker-kill-every-ms 10000 \
  --postgres-restart-every-ms 6000 --postgres-down-ms 1000 --garbage-every-ms 100 \
  --postgres-read-only-every-ms 7000 --postgres-read-only-ms 2000 \
  --topic-delete-every-ms 12000 --topic-down-ms 3000 \
  --settle-timeout-secs 90

# The chaos suite on network hosts (`sagactl chaos --network`, about 4 minutes): every broker
# node, PostgreSQL and service instance in a network namespace of its own on a bridge, with a
# PostgreSQL and a three-node cluster of the run's own (and the payment participant on a database
# of its own, on a second PostgreSQL on its own host, pg2: a participant-database fault that picks
# a payment instance cuts it from that one); two orchestrators and two instances of
# each participant, in KIP-848 groups (as on the cluster above; the long run in BENCHMARKS.md
# runs classic ones). 600 sagas over 60 s while a link fault of each class comes in turn (seeded,
# 8 s each: an orchestrator cut from the brokers, then from PostgreSQL; a participant instance
# cut from PostgreSQL; a broker cut from its peers, then from every client; every link slow and
# lossy), a service SIGKILLed every 5 s, PostgreSQL restarted every 25 s (2 or 3 times); every
# invariant as above, every saga finished within 90 s of the last heal,
# and every outbox relay LISTENing again after the restarts (a relay cut from PostgreSQL while
# it restarted once stayed deaf: messaging/src/relay.rs checks a quiet listener). Its report
# gives each fault's window: the sagas in flight, their p99, the longest stall, and how long
# after the heal they had all finished. One orchestrator runs ten minutes ahead and one inventory
# instance ten minutes behind (--clock-skew: their wall clocks and every wait on them, README,
# "On network hosts").
phase "chaos on network hosts"
target/debug/sagactl chaos --network --participant-instances 2 --group-protocol consumer \
  --sagas 600 --rate 10 --link-fault-every-ms 2000 --link-fault-ms 8000 --kill-every-ms 5000 \
  --postgres-restart-every-ms 25000 --postgres-down-ms 1000 --settle-timeout-secs 180 \
  --clock-skew orchestrator-2=600 --clock-skew inventory-2=-600 --own-database payment

# The last three share the machine (with what is left of the fuzzers), each with a database, a
# topic prefix and ports of its own: the walkthroughs in the background (their log is printed
# when they end), the page test and the benchmark's smoke run meanwhile.
phase "the page in Chromium, the walkthroughs, the benchmark's smoke run and the fuzzers"
set -m
# The README's walkthroughs on a copy of the repository (scripts/walkthrough.sh): a step is
# three hand-written files and a saga type its definition, messages and participants' code,
# `sagactl generate` writes the rest, and both run (about two minutes: the copy is built).
scripts/walkthrough.sh >target/artifacts/walkthrough.log 2>&1 &
walkthrough=$!
background+=("$walkthrough")
set +m

# The operations page in a real browser: Playwright drives Debian's Chromium (installed here if
# missing) against the services as processes; screenshots go to target/artifacts/.
scripts/browser-test.sh

# A smoke run of the benchmark, so that its command cannot rot: a few seconds, debug build,
# two instances of every service (BENCH_INSTANCES, the measurement of 1 against 2 in
# BENCHMARKS.md). Each instance of a service that had work must have done part of it, read off
# the report's per-instance work (from each instance's own /metrics): 40 orders over 4
# partitions leave one of two instances without a record about once in 2^30 runs. The orders
# go to 64 customers and SKUs of the load's own (--spread, as in that measurement).
BENCH_INSTANCES=2 BENCH_PROFILE=debug scripts/bench.sh --orders 40 --in-flight 4 --failure-percent 20 \
  --spread 64 --warmup-secs 0 --json target/artifacts/bench-smoke.json
if ! jq -e '[.work | group_by(.service)[] | select(map(.records) | add > 0) | .[] | .records > 0] | all' \
  target/artifacts/bench-smoke.json >/dev/null; then
  echo "test.sh: the benchmark's instances did not share the work:" >&2
  jq -r '.work[] | "  \(.name): \(.records) records from partitions \(.partitions)"' target/artifacts/bench-smoke.json >&2
  exit 1
fi
# The spread's customers and SKUs were added and used: 20% are built to fail, so fewer than half
# completed means the orders met no stock or no money.
if ! jq -e '.completed > .orders / 2' target/artifacts/bench-smoke.json >/dev/null; then
  echo "test.sh: the benchmark's spread orders did not complete: $(jq -c '{orders, completed, compensated}' target/artifacts/bench-smoke.json)" >&2
  exit 1
fi

finish "the walkthroughs" "$walkthrough" target/artifacts/walkthrough.log
finish "the fuzzers" "$fuzz" target/artifacts/fuzz.log
