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
# bounds the JVM heap. KAFKA_JVM_EXTRA_OPTS (default none) is added to every JVM this script
# starts, the brokers' and the Kafka tools' (scripts/test.sh: C1 only, for short-lived brokers).
#
# BROKER=nisshi runs Nisshi instead, a Kafka-protocol broker written in Rust (cargo install,
# about 11 minutes), for a machine without Java. It has no transactions and its fetch long-poll
# is not woken by new data, so each hop waits out fetch.wait.max.ms: not for measurements.
#
# BROKER_NODES=3 runs the secured, replicated cluster instead: three KRaft nodes (node.id 1, 2,
# 3; each controller and broker), TLS and SASL, StandardAuthorizer with ACLs, replication 3,
# min.insync.replicas 2 (settings: scripts/kafka/cluster.properties). Its commands:
#
#   BROKER_NODES=3 scripts/broker.sh start        # all three nodes (formatted on first start)
#   BROKER_NODES=3 scripts/broker.sh stop         # SIGTERM to all three at once, wait
#   BROKER_NODES=3 scripts/broker.sh kill         # SIGKILL all three
#   BROKER_NODES=3 scripts/broker.sh running      # exit 0 when every node answers
#   BROKER_NODES=3 scripts/broker.sh kill-node N  # SIGKILL node N, return once it is gone
#   BROKER_NODES=3 scripts/broker.sh stop-node N  # SIGTERM node N (controlled shutdown), wait
#   BROKER_NODES=3 scripts/broker.sh start-node N # start node N, return once it is serving
#   BROKER_NODES=3 scripts/broker.sh node-pid N   # print node N's pid (exit 1: not running)
#   BROKER_NODES=3 scripts/broker.sh node-addr N  # print node N's SASL_SSL address
#   BROKER_NODES=3 scripts/broker.sh wipe         # stop, then delete data, users and keys
#
# Everything goes to .run/cluster/ (or $BROKER_RUN_DIR):
#   cluster.env             KAFKA_BROKERS (SASL_SSL), KAFKA_BROKERS_MTLS (SSL, client
#                           certificate), KAFKA_BROKERS_SASL_PLAINTEXT, KAFKA_CLUSTER_DIR and
#                           KAFKA_IDENTITIES, as shell assignments (source it)
#   clients/NAME.properties       librdkafka client properties of identity NAME: SASL_SSL,
#                                 SCRAM-SHA-512, the CA (for KAFKA_CLIENT_PROPERTIES)
#   clients/NAME.mtls.properties  the same identity by mutual TLS (certificate CN=NAME)
#   secrets/NAME.password   NAME's password (mode 600)
#   pki/                    the cluster's CA (ca.crt), node and client certificates (pki.sh)
#   node-N/                 node N's server.properties (mode 600: it holds the PLAIN users'
#                           passwords), data, node.log and pid
# Identities: admin (a super user: topics and ACLs, scripts/provision-kafka.sh), orchestrator,
# every participant `services` (common.sh) lists, and client (the public client: orders in,
# saga events out). Each has a SCRAM-SHA-512 and a SCRAM-SHA-256 credential (created at format
# time) and a PLAIN password; a certificate with CN=NAME authenticates as the same user. The
# nodes listen on 127.0.0.1, node N (1-3) from port $KAFKA_CLUSTER_PORT_BASE (default 19100)
# + 10 * (N - 1): +0 CLIENT (SASL_SSL), +1 MTLS (SSL), +2 CLEARTEXT (SASL_PLAINTEXT),
# +3 INTERNAL (SSL, between brokers), +4 CONTROLLER (SSL). KAFKA_HEAP_MAX defaults to 256m here.
#
# On network hosts (the network chaos run, `sagactl chaos --network`): KAFKA_CLUSTER_HOSTS
# names each node's address ("10.231.9.11 10.231.9.12 10.231.9.13": node N listens on the N-th,
# and its certificate names it) and KAFKA_CLUSTER_NETNS the network namespace each node's JVM
# runs in (`ip netns exec`). `start` keeps both in network.env of the cluster's folder, so that
# later calls (kill-node, start-node) need only BROKER_RUN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BROKER="${BROKER:-kafka}"
BROKER_ADDR="${BROKER_ADDR:-127.0.0.1:9092}"
BROKER_HOST="${BROKER_ADDR%:*}"
BROKER_PORT="${BROKER_ADDR##*:}"
BROKER_NODES="${BROKER_NODES:-1}"
if [[ $BROKER_NODES == 1 ]]; then
  RUN_DIR="${BROKER_RUN_DIR:-$ROOT/.run/broker}"
else
  RUN_DIR="${BROKER_RUN_DIR:-$ROOT/.run/cluster}"
fi
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
  # shellcheck disable=SC2086 # options, split on purpose
  java ${KAFKA_JVM_EXTRA_OPTS:-} -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DESCRIPTOR/log4j2.yaml" "$@"
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
    ${KAFKA_JVM_EXTRA_OPTS:-} \
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

# ---------------------------------------------------------------------------------------------
# The secured three-node cluster (BROKER_NODES=3).
CLUSTER_NODES=(1 2 3)
if [[ $BROKER_NODES != 1 && -z ${KAFKA_CLUSTER_HOSTS:-} && -f "$RUN_DIR/network.env" ]]; then
  source "$RUN_DIR/network.env"
fi
read -r -a CLUSTER_HOSTS <<<"${KAFKA_CLUSTER_HOSTS:-127.0.0.1 127.0.0.1 127.0.0.1}"
read -r -a CLUSTER_NETNS <<<"${KAFKA_CLUSTER_NETNS:-}"
# node_host N: node N's address.
node_host() { echo "${CLUSTER_HOSTS[$(($1 - 1))]}"; }
# node_host_exec N: the words that run a command on node N's network host (none without
# namespaces); `ip netns exec` execs the command, so `$!` stays the command's pid.
node_host_exec() {
  ((${#CLUSTER_NETNS[@]})) && echo "ip netns exec ${CLUSTER_NETNS[$(($1 - 1))]}"
  return 0
}
CLUSTER_PORT_BASE="${KAFKA_CLUSTER_PORT_BASE:-19100}"
CLUSTER_PKI="$RUN_DIR/pki"

# node_port N OFFSET: node N's port for the listener at OFFSET (see the header).
node_port() { echo $((CLUSTER_PORT_BASE + 10 * ($1 - 1) + $2)); }
node_dir() { echo "$RUN_DIR/node-$1"; }
# bootstrap OFFSET: every node's address for the listener at OFFSET, comma separated.
bootstrap() {
  local n list=()
  for n in "${CLUSTER_NODES[@]}"; do list+=("$(node_host "$n"):$(node_port "$n" "$1")"); done
  (IFS=,; echo "${list[*]}")
}

# identities: the cluster's users, one per line: the admin, the services (the orchestrator and
# every participant the saga definitions name) and the public client.
identities() {
  echo admin
  services
  echo client
}

pki() { PKI_DIR="$CLUSTER_PKI" "$ROOT/scripts/pki.sh" "$@"; }

# password NAME: NAME's password, made once (random, mode 600).
password() {
  local file="$RUN_DIR/secrets/$1.password"
  if [[ ! -f "$file" ]]; then
    mkdir -p "$RUN_DIR/secrets"
    (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$file")
  fi
  cat "$file"
}

# cluster_prepare: certificates, passwords, each node's properties and the client files; kept
# when they exist (a restart formats nothing and changes no secret).
cluster_prepare() {
  install_kafka
  ensure_commands openssl:openssl keytool:openjdk-17-jre-headless
  (umask 077 && mkdir -p "$RUN_DIR/clients" "$RUN_DIR/secrets")
  ((${#CLUSTER_HOSTS[@]} == 3)) || { echo "KAFKA_CLUSTER_HOSTS must name 3 addresses" >&2; return 2; }
  ((${#CLUSTER_NETNS[@]} == 0 || ${#CLUSTER_NETNS[@]} == 3)) || {
    echo "KAFKA_CLUSTER_NETNS must name 3 namespaces, or none" >&2
    return 2
  }
  printf 'KAFKA_CLUSTER_HOSTS="%s"\nKAFKA_CLUSTER_NETNS="%s"\n' "${CLUSTER_HOSTS[*]}" "${CLUSTER_NETNS[*]}" >"$RUN_DIR/network.env"
  local ca store_password name n voters=() plain_users=""
  ca="$(pki ca)"
  store_password="$(cat "$CLUSTER_PKI/keystore.password")"
  for name in $(identities); do
    pki issue "$name" >/dev/null
    plain_users+=" user_$name=\"$(password "$name")\""
  done
  (umask 077
    for name in $(identities); do
      printf '%s\n' "# Identity $name on the secured cluster: SASL_SSL, SCRAM-SHA-512 (bootstrap: KAFKA_BROKERS in ../cluster.env)." \
        "security.protocol=SASL_SSL" "sasl.mechanism=SCRAM-SHA-512" "sasl.username=$name" \
        "sasl.password=$(password "$name")" "ssl.ca.location=$ca" >"$RUN_DIR/clients/$name.properties"
      printf '%s\n' "# Identity $name on the secured cluster: mutual TLS, certificate CN=$name (bootstrap: KAFKA_BROKERS_MTLS in ../cluster.env)." \
        "security.protocol=SSL" "ssl.ca.location=$ca" "ssl.certificate.location=$CLUSTER_PKI/$name.crt" \
        "ssl.key.location=$CLUSTER_PKI/$name.key" >"$RUN_DIR/clients/$name.mtls.properties"
    done)
  for n in "${CLUSTER_NODES[@]}"; do
    pki issue "kafka-$n" "IP:$(node_host "$n"),IP:127.0.0.1,DNS:localhost" >/dev/null
    voters+=("$n@$(node_host "$n"):$(node_port "$n" 4)")
  done
  for n in "${CLUSTER_NODES[@]}"; do
    local dir listeners advertised host
    dir="$(node_dir "$n")"
    host="$(node_host "$n")"
    mkdir -p "$dir"
    listeners="CLIENT://$host:$(node_port "$n" 0),MTLS://$host:$(node_port "$n" 1),CLEARTEXT://$host:$(node_port "$n" 2),INTERNAL://$host:$(node_port "$n" 3)"
    advertised="$listeners"
    listeners+=",CONTROLLER://$host:$(node_port "$n" 4)"
    (umask 077
      { cat "$KAFKA_DESCRIPTOR/server.properties" "$KAFKA_DESCRIPTOR/cluster.properties"
        printf '%s\n' "" "# Node $n (written by scripts/broker.sh)" \
          "node.id=$n" "log.dirs=$dir/data" \
          "controller.quorum.voters=$(IFS=,; echo "${voters[*]}")" \
          "listeners=$listeners" "advertised.listeners=$advertised" \
          "super.users=User:admin;User:kafka-1;User:kafka-2;User:kafka-3" \
          "ssl.keystore.location=$CLUSTER_PKI/kafka-$n.p12" "ssl.keystore.password=$store_password" \
          "ssl.truststore.location=$CLUSTER_PKI/truststore.p12" "ssl.truststore.password=$store_password" \
          "listener.name.client.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;" \
          "listener.name.cleartext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;"
      } >"$dir/server.properties")
  done
  {
    echo "# The secured three-node cluster (scripts/broker.sh with BROKER_NODES=3)."
    echo "KAFKA_CLUSTER_DIR=$RUN_DIR"
    echo "KAFKA_BROKERS=$(bootstrap 0)"
    echo "KAFKA_BROKERS_MTLS=$(bootstrap 1)"
    echo "KAFKA_BROKERS_SASL_PLAINTEXT=$(bootstrap 2)"
    echo "KAFKA_IDENTITIES=\"$(identities | tr '\n' ' ' | sed 's/ $//')\""
  } >"$RUN_DIR/cluster.env"
}

# cluster_format: formats every node not formatted yet, with the same cluster id and every
# identity's SCRAM credentials. The credentials go through a Java argument file (mode 600), not
# the command line, so that no password shows in the process list.
cluster_format() {
  local n cluster_id args name
  # The tool logs to stdout too; the id is its last line.
  [[ -s "$RUN_DIR/cluster.id" ]] || kafka kafka.tools.StorageTool random-uuid | tail -1 >"$RUN_DIR/cluster.id"
  cluster_id="$(cat "$RUN_DIR/cluster.id")"
  for n in "${CLUSTER_NODES[@]}"; do
    [[ -f "$(node_dir "$n")/data/meta.properties" ]] && continue
    args="$(node_dir "$n")/format.args"
    (umask 077
      { printf '%s\n' kafka.tools.StorageTool format -t "$cluster_id" -c "$(node_dir "$n")/server.properties"
        for name in $(identities); do
          printf '%s\n' --add-scram "SCRAM-SHA-512=[name=$name,password=$(password "$name")]" \
            --add-scram "SCRAM-SHA-256=[name=$name,password=$(password "$name")]"
        done
      } >"$args")
    # shellcheck disable=SC2086 # options, split on purpose
    java ${KAFKA_JVM_EXTRA_OPTS:-} -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DESCRIPTOR/log4j2.yaml" "@$args" \
      >"$(node_dir "$n")/format.log" 2>&1 || {
      cat "$(node_dir "$n")/format.log" >&2
      rm -f "$args"
      return 1
    }
    rm -f "$args"
  done
}

node_pid() {
  local file
  file="$(node_dir "$1")/pid"
  [[ -f "$file" ]] && kill -0 "$(cat "$file")" 2>/dev/null && cat "$file"
}

# launch_node N: starts node N's JVM in the background; prints the log line it starts from.
launch_node() {
  local dir
  dir="$(node_dir "$1")"
  touch "$dir/node.log"
  echo $(($(wc -l <"$dir/node.log") + 1))
  # shellcheck disable=SC2046 # words, split on purpose
  $(node_host_exec "$1") nohup java -Xms128m -Xmx"${KAFKA_HEAP_MAX:-256m}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    ${KAFKA_JVM_EXTRA_OPTS:-} \
    -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DESCRIPTOR/log4j2.yaml" \
    kafka.Kafka "$dir/server.properties" >>"$dir/node.log" 2>&1 &
  echo $! >"$dir/pid"
}

# await_nodes STARTS: waits (up to 120 s) until every node N in the associative array named
# STARTS has logged "Kafka Server started" after line STARTS[N] of its log; a node whose JVM exits fails it at once.
await_nodes() {
  local -n starts="$1"
  local n pending
  for _ in $(seq 1 1200); do
    pending=0
    for n in "${!starts[@]}"; do
      local dir
      dir="$(node_dir "$n")"
      if ! node_pid "$n" >/dev/null; then
        echo "node $n exited during start; see $dir/node.log" >&2
        tail -n +"${starts[$n]}" "$dir/node.log" | grep -E "ERROR|Exception" | tail -10 >&2 || true
        return 1
      fi
      # Not `tail | grep -q`: with pipefail, tail killed by SIGPIPE (grep -q stops at the
      # first match of a long log) would fail the check after the node has started.
      grep -q "Kafka Server started" < <(tail -n +"${starts[$n]}" "$dir/node.log") || pending=1
    done
    ((pending)) || return 0
    sleep 0.1
  done
  echo "the cluster did not start in 120 s; see $RUN_DIR/node-*/node.log" >&2
  return 1
}

cluster_start() {
  local n began=$SECONDS
  declare -A from=()
  cluster_prepare
  cluster_format
  for n in "${CLUSTER_NODES[@]}"; do
    node_pid "$n" >/dev/null && continue
    from[$n]="$(launch_node "$n")"
  done
  ((${#from[@]})) || { echo "the cluster is already running" >&2; return 0; }
  await_nodes from || return 1
  echo "kafka cluster: nodes ${!from[*]} started in $((SECONDS - began)) s; clients: $RUN_DIR/cluster.env" >&2
}

node_start() {
  local began=$SECONDS
  declare -A from=()
  node_pid "$1" >/dev/null && { echo "node $1 is already running" >&2; return 0; }
  from[$1]="$(launch_node "$1")"
  await_nodes from || return 1
  echo "kafka node $1 started in $((SECONDS - began)) s (pid $(node_pid "$1"))" >&2
}

# node_stop SIGNAL N...: signals the nodes, then waits up to 60 s for them to exit (the last
# node of a quorum alone can hang on its controlled shutdown) before SIGKILL.
node_stop() {
  local signal="$1" n pid pids=()
  shift
  for n in "$@"; do
    pid="$(node_pid "$n")" || continue
    kill "-$signal" "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for _ in $(seq 1 600); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for n in "$@"; do rm -f "$(node_dir "$n")/pid"; done
}

cluster_running() {
  local n
  for n in "${CLUSTER_NODES[@]}"; do tcp_open "$(node_host "$n"):$(node_port "$n" 0)" || return 1; done
}

node_arg() {
  [[ "${1:-}" =~ ^[123]$ ]] || { echo "node must be 1, 2 or 3, not '${1:-}'" >&2; exit 2; }
}

if [[ $BROKER_NODES != 1 ]]; then
  [[ $BROKER_NODES == 3 && $BROKER == kafka ]] || {
    echo "BROKER_NODES must be 1 or 3 (3 with BROKER=kafka), not $BROKER_NODES" >&2
    exit 2
  }
  case "${1:-}" in
    install) install_kafka ;;
    start) cluster_start ;;
    stop) node_stop TERM "${CLUSTER_NODES[@]}" ;;
    kill) node_stop KILL "${CLUSTER_NODES[@]}" ;;
    running) cluster_running ;;
    kill-node) node_arg "${2:-}"; node_stop KILL "$2" ;;
    stop-node) node_arg "${2:-}"; node_stop TERM "$2" ;;
    start-node) node_arg "${2:-}"; node_start "$2" ;;
    node-pid) node_arg "${2:-}"; node_pid "$2" ;;
    node-addr) node_arg "${2:-}"; echo "$(node_host "$2"):$(node_port "$2" 0)" ;;
    wipe) node_stop TERM "${CLUSTER_NODES[@]}"; rm -rf "$RUN_DIR" ;;
    *) echo "usage: BROKER_NODES=3 $0 install|start|stop|kill|running|kill-node N|stop-node N|start-node N|node-pid N|node-addr N|wipe" >&2; exit 2 ;;
  esac
  exit
fi

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
