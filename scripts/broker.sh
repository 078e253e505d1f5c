#!/usr/bin/env bash
# Installs and runs Nisshi, the Kafka-protocol broker used by the tests and the demo.
#
#   scripts/broker.sh install   # cargo install nisshi 0.8.1 unless it is already there
#   scripts/broker.sh start     # start it on $BROKER_ADDR (default 127.0.0.1:9092) unless running
#   scripts/broker.sh stop      # stop the broker this script started
#   scripts/broker.sh running   # exit 0 when something listens on $BROKER_ADDR
#
# Data lives in .run/broker/ (SQLite storage, survives broker restarts).
set -euo pipefail

NISSHI_VERSION=0.8.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run/broker"
BROKER_ADDR="${BROKER_ADDR:-127.0.0.1:9092}"
export PATH="$HOME/.cargo/bin:$PATH"

port_open() {
  (exec 3<>"/dev/tcp/${BROKER_ADDR%:*}/${BROKER_ADDR##*:}") 2>/dev/null
}

install() {
  if command -v nisshi >/dev/null && nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
    return 0
  fi
  echo "installing nisshi $NISSHI_VERSION (about 11 minutes on 2 cores)..." >&2
  # Its manifest asks for a newer Rust than some machines have; it builds fine without it.
  cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version
}

start() {
  if port_open; then
    echo "a broker already listens on $BROKER_ADDR" >&2
    return 0
  fi
  install
  mkdir -p "$RUN_DIR"
  cd "$RUN_DIR"
  # The SQLite path is resolved against the working directory.
  nohup nisshi broker \
    --listener-url "tcp://$BROKER_ADDR" \
    --advertised-listener-url "tcp://$BROKER_ADDR" \
    --storage-engine sqlite://broker.db \
    --group-initial-rebalance-delay 0s \
    >"$RUN_DIR/broker.log" 2>&1 &
  echo $! >"$RUN_DIR/broker.pid"
  for _ in $(seq 1 100); do
    if port_open; then
      echo "broker listening on $BROKER_ADDR (pid $(cat "$RUN_DIR/broker.pid"), log $RUN_DIR/broker.log)" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "broker did not start; see $RUN_DIR/broker.log" >&2
  tail -20 "$RUN_DIR/broker.log" >&2 || true
  return 1
}

stop() {
  if [[ -f "$RUN_DIR/broker.pid" ]]; then
    kill "$(cat "$RUN_DIR/broker.pid")" 2>/dev/null || true
    rm -f "$RUN_DIR/broker.pid"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  running) port_open ;;
  *) echo "usage: $0 install|start|stop|running" >&2; exit 2 ;;
esac
