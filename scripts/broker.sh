#!/usr/bin/env bash
# Installs and runs the Kafka broker the services, the tests, the chaos suite and the
# benchmarks use: Apache Kafka (version pinned in scripts/kafka/pom.xml) as one KRaft node,
# controller and broker in one JVM, built from its Maven Central artifacts.
#
#   scripts/broker.sh install   # Java and Maven from Debian if missing, then the broker's jars
#   scripts/broker.sh start     # start it on $BROKER_ADDR (default 127.0.0.1:9092) unless running
#   scripts/broker.sh stop      # stop the broker this script started (controlled shutdown)
#   scripts/broker.sh kill      # SIGKILL it (the chaos suite's broker fault)
#   scripts/broker.sh running   # exit 0 when something listens on $BROKER_ADDR
#
# Jars go to .run/kafka-<version>/libs; data (formatted once) and the log to .run/broker/, or to
# $BROKER_RUN_DIR: with it and another $BROKER_ADDR a second, private broker runs beside the
# shared one (a test that stops its broker starts one so; stop/kill then act on that one only).
# The controller listens on the next port ($BROKER_ADDR's port + 1). KAFKA_HEAP_MAX (default 1g)
# bounds the JVM heap.
#
# BROKER=nisshi runs Nisshi instead, a Kafka-protocol broker written in Rust (cargo install,
# about 11 minutes), for a machine without Java. It has no transactions and its fetch long-poll
# is not woken by new data, so each hop waits out fetch.wait.max.ms: not for measurements.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BROKER="${BROKER:-kafka}"
BROKER_ADDR="${BROKER_ADDR:-127.0.0.1:9092}"
BROKER_HOST="${BROKER_ADDR%:*}"
BROKER_PORT="${BROKER_ADDR##*:}"
RUN_DIR="${BROKER_RUN_DIR:-$ROOT/.run/broker}"
PID_FILE="$RUN_DIR/broker.pid"
LOG_FILE="$RUN_DIR/broker.log"
KAFKA_DESCRIPTOR="$ROOT/scripts/kafka"
KAFKA_VERSION="$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$KAFKA_DESCRIPTOR/pom.xml")"
KAFKA_LIBS="$ROOT/.run/kafka-$KAFKA_VERSION/libs"
NISSHI_VERSION=0.8.1

install_kafka() {
  [[ -f "$KAFKA_LIBS/.complete" ]] && return 0
  ensure_commands java:openjdk-17-jre-headless mvn:maven
  local began=$SECONDS
  echo "fetching Apache Kafka $KAFKA_VERSION from Maven Central..." >&2
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$RUN_DIR"
  mvn -B -f "$KAFKA_DESCRIPTOR/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$RUN_DIR/install.log" 2>&1 || {
    tail -30 "$RUN_DIR/install.log" >&2
    return 1
  }
  touch "$KAFKA_LIBS/.complete"
  echo "installed Apache Kafka $KAFKA_VERSION in $((SECONDS - began)) s ($KAFKA_LIBS)" >&2
}

install_nisshi() {
  if command -v nisshi >/dev/null && nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
    return 0
  fi
  echo "installing nisshi $NISSHI_VERSION (about 11 minutes on 2 cores)..." >&2
  # Its manifest asks for a newer Rust than some machines have; it builds fine without it.
  cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version
}

kafka() {
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DESCRIPTOR/log4j2.yaml" "$@"
}

launch_kafka() {
  local data_dir="$RUN_DIR/data" controller="$BROKER_HOST:$((BROKER_PORT + 1))"
  local settings=(
    "log.dirs=$data_dir"
    "listeners=PLAINTEXT://$BROKER_ADDR,CONTROLLER://$controller"
    "advertised.listeners=PLAINTEXT://$BROKER_ADDR,CONTROLLER://$controller"
    "controller.quorum.bootstrap.servers=$controller"
  )
  if [[ ! -f "$data_dir/meta.properties" ]]; then
    # Format the storage once: a one-node dynamic quorum whose only voter is this node.
    local config="$RUN_DIR/format.properties"
    { cat "$KAFKA_DESCRIPTOR/server.properties"; printf '%s\n' "${settings[@]}"; } >"$config"
    kafka kafka.tools.StorageTool format --standalone -t "$(kafka kafka.tools.StorageTool random-uuid)" \
      -c "$config" >"$RUN_DIR/format.log" 2>&1 || {
      cat "$RUN_DIR/format.log" >&2
      return 1
    }
  fi
  local overrides=() setting
  for setting in "${settings[@]}"; do overrides+=(--override "$setting"); done
  # The JVM settings of Kafka's own start script, with a bounded heap.
  nohup java -Xms256m -Xmx"${KAFKA_HEAP_MAX:-1g}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DESCRIPTOR/log4j2.yaml" \
    kafka.Kafka "$KAFKA_DESCRIPTOR/server.properties" "${overrides[@]}" >>"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
}

launch_nisshi() {
  cd "$RUN_DIR"
  # The SQLite path is resolved against the working directory.
  nohup nisshi broker \
    --listener-url "tcp://$BROKER_ADDR" \
    --advertised-listener-url "tcp://$BROKER_ADDR" \
    --storage-engine sqlite://broker.db \
    --group-initial-rebalance-delay 0s \
    >>"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
}

# Ready means the broker answers on its port and (Kafka) has finished starting: Kafka opens
# its listener before it can serve metadata.
ready() {
  tcp_open "$BROKER_ADDR" || return 1
  [[ $BROKER == nisshi ]] || tail -n +"$1" "$LOG_FILE" | grep -q "Kafka Server started"
}

start() {
  if tcp_open "$BROKER_ADDR"; then
    echo "a broker already listens on $BROKER_ADDR" >&2
    return 0
  fi
  "install_$BROKER"
  mkdir -p "$RUN_DIR"
  touch "$LOG_FILE"
  local began=$SECONDS from_line
  from_line=$(($(wc -l <"$LOG_FILE") + 1))
  "launch_$BROKER"
  for _ in $(seq 1 600); do
    if ready "$from_line"; then
      echo "$BROKER broker listening on $BROKER_ADDR (pid $(cat "$PID_FILE"), started in $((SECONDS - began)) s, log $LOG_FILE)" >&2
      return 0
    fi
    if ! kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
  echo "the $BROKER broker did not start; see $LOG_FILE" >&2
  tail -n +"$from_line" "$LOG_FILE" | grep -E "ERROR|Exception" | tail -20 >&2 || true
  return 1
}

# stop SIGNAL: signals the broker this script started and waits for it to exit.
stop() {
  [[ -f "$PID_FILE" ]] || return 0
  local pid
  pid="$(cat "$PID_FILE")"
  kill "-$1" "$pid" 2>/dev/null || true
  # A controlled shutdown moves nothing on one node and takes a few seconds.
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
}

case "$BROKER" in
  kafka | nisshi) ;;
  *) echo "BROKER must be kafka or nisshi, not $BROKER" >&2; exit 2 ;;
esac
case "${1:-}" in
  install) "install_$BROKER" ;;
  start) start ;;
  stop) stop TERM ;;
  kill) stop KILL ;;
  running) tcp_open "$BROKER_ADDR" ;;
  *) echo "usage: $0 install|start|stop|kill|running" >&2; exit 2 ;;
esac
