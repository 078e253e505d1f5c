# Sourced by the scripts in this folder: the repository root, PATH with cargo, and installers
# for the Debian packages a fresh machine may lack.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
# The saga definitions every orchestrator the scripts start reads, wherever it runs from.
export SAGAS_DIR="${SAGAS_DIR:-$ROOT/sagas}"

# services: the services of a deployment, one per line: the orchestrator, then every
# participant a saga definition names (`participant = "..."` in $SAGAS_DIR/*.toml), each a
# binary of its name. The scripts start what this lists, so a saga with a new participant
# needs no script change.
services() {
  echo orchestrator
  sed -n 's/^[[:space:]]*participant[[:space:]]*=[[:space:]]*"\([a-z][a-z0-9_]*\)".*/\1/p' \
    "$SAGAS_DIR"/*.toml | sort -u
}

# as_root CMD...: runs CMD as root (directly when we are root, else through sudo).
as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

# apt_install PACKAGE...: installs Debian packages, after `apt-get update` (a fresh machine's
# package lists may be empty).
apt_install() {
  echo "installing Debian packages: $*" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ensure_commands CMD:PACKAGE...: installs, in one apt-get call, the packages whose command is
# missing.
ensure_commands() {
  local missing=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# ensure_build_dependencies: what building the workspace needs besides Rust: librdkafka is
# built with TLS and SASL (rdkafka's `ssl` feature), against OpenSSL's headers found through
# pkg-config.
ensure_build_dependencies() {
  local missing=() package
  for package in libssl-dev pkg-config make; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

# tcp_open HOST:PORT: exit 0 when something accepts connections there.
tcp_open() {
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

# free_port: a loopback TCP port the kernel has free now (should another process take it first,
# the caller's health check fails and says so).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_dependencies: the clients the scripts use, PostgreSQL and the broker on
# $KAFKA_BROKERS, each installed and started when missing. Sets STARTED_BROKER=1 when it started
# the broker (so a caller can stop it again).
start_dependencies() {
  ensure_commands curl:curl jq:jq psql:postgresql-client
  ensure_build_dependencies
  "$ROOT/scripts/postgres.sh" start
  STARTED_BROKER=0
  if ! BROKER_ADDR="$KAFKA_BROKERS" "$ROOT/scripts/broker.sh" running; then
    BROKER_ADDR="$KAFKA_BROKERS" "$ROOT/scripts/broker.sh" start
    STARTED_BROKER=1
  fi
}

# make_api_tokens FILE NAME:ROLES...: a random token for each NAME (ROLES: comma-separated
# viewer, client, operator). Writes their SHA-256 hashes, never the tokens, to FILE (the
# orchestrator's token list, exported as API_TOKENS_FILE) and sets TOKEN_<NAME> (dashes as
# underscores) to each token for the calling script.
make_api_tokens() {
  local file="$1" spec name roles token
  shift
  mkdir -p "$(dirname "$file")"
  (umask 077 && : >"$file")
  for spec in "$@"; do
    name="${spec%%:*}" roles="${spec#*:}"
    token="$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
    printf '%s %s sha256:%s\n' "$name" "$roles" \
      "$(printf %s "$token" | sha256sum | cut -d' ' -f1)" >>"$file"
    printf -v "TOKEN_${name//-/_}" %s "$token"
  done
  export API_TOKENS_FILE="$file"
}

# ---------------------------------------------------------------------------------------------
# The benchmark deployment, shared by bench.sh and watch-bench.sh.
#
# bench_start_stack: starts PostgreSQL and the broker if needed, builds the binaries
# (BENCH_PROFILE: release, the default, or debug), creates a fresh database and topic prefix,
# starts BENCH_INSTANCES (default 1) instances of the orchestrator and of each participant as
# separate processes (from BENCH_SERVICES_DIR when set: another build's target/release) and
# waits until every one is ready (`/readyz`: it joined its consumer group; `/healthz` for a
# build without the probe). Under the classic group protocol (the default) the last instance's
# assignment ends the rebalance that gives every instance its share, so the load starts on
# settled groups; under KIP-848 (KAFKA_GROUP_PROTOCOL=consumer) a first assignment may be empty
# while partitions still move, for the run's first seconds.
# The instances of a service share its database, topic prefix and consumer group, so the group
# divides the partitions between them (TOPIC_PARTITIONS, 4 by default: more instances than that
# leave some idle). Each has its own ports: the first orchestrator HTTP_ADDR and OPS_HTTP_ADDR
# (a free port when unset), every other process free ports (METRICS_ADDR for a participant's
# /metrics and probes); with BENCH_METRICS_PORT_BASE set, a participant's METRICS_ADDR is that
# base + its place in the services' list, plus the number of services for each instance after
# the first. A fixed address something already listens on stops the start: a service that
# cannot bind its metrics port runs on without it, and the benchmark would read another
# process's page (another developer's inventory on 9181 once). A KAFKA_GROUP_INSTANCE_ID set for the services (in the
# environment or BENCH_ENV_<service>) gets each instance's number appended when there are
# several, as static members of one group need ids of their own. The load generator needs no
# address: it publishes orders to Kafka, and the orchestrators' group spreads them by partition.
# Afterwards:
#   DATABASE_URL, TOPIC_PREFIX, KAFKA_BROKERS, HTTP_ADDR  exported, the deployment's (HTTP_ADDR:
#                     the first orchestrator's API)
#   BENCH_NAMES       the processes' names: the service's (`orchestrator`, `inventory`, ...) with
#                     one instance each, else with the instance's number (`orchestrator-1`,
#                     `orchestrator-2`, `inventory-1`, ...); in the order `services` lists them,
#                     each service's instances together
#   BENCH_PIDS        their pids, in the same order
#   BENCH_LOG_DIR     their logs (NAME.log)
#   BENCH_OPS_ADDR    where the first orchestrator's /healthz and /metrics answer without a
#                     token: its OPS_HTTP_ADDR (HTTP_ADDR for a build that does not serve one)
#   BENCH_SAGACTL     this build's sagactl
#   BENCH_ACCOUNTING  the `sagactl load` arguments that account for every process (CPU, memory,
#                     /metrics, by the names above; the broker's JVM and PostgreSQL too) and the
#                     SQL statements
# Knobs: BENCH_INSTANCES, BENCH_DATABASE_SERVER, BENCH_DATABASE_OPTIONS (e.g.
# "?host=/var/run/postgresql"), BENCH_METRICS_PORT_BASE (default: free ports), BENCH_READY_TIMEOUT_SECS
# (default 120: how long the instances may take to be ready), and extra environment for one
# service's instances in the array BENCH_ENV_<service>, e.g.
#   BENCH_ENV_inventory=(FAULT_COMPENSATION_FAILURES=1000)
# Without API_TOKENS_FILE or API_TOKENS for the orchestrator, it runs with
# API_OPEN_ON_LOOPBACK=true (the API's auth, issue 12, needs one or the other).
# BENCH_SECURED_KAFKA=1: on the secured three-node cluster instead of the plaintext broker
# (`BROKER_NODES=3 scripts/broker.sh start`, started if needed; KAFKA_BROKERS from its
# cluster.env): the admin step (scripts/provision-kafka.sh) creates the prefix's topics
# (replication 3) and ACLs, each service runs as its own identity, and the load generator as the
# admin (KAFKA_CLIENT_PROPERTIES exported); the three nodes' JVMs are accounted as broker-1..3.
# The caller sets `trap bench_stop_stack EXIT` first.
BENCH_PIDS=()
BENCH_NAMES=()
BENCH_DATABASE=""

bench_start_stack() {
  local instances="${BENCH_INSTANCES:-1}"
  if ! [[ $instances =~ ^[1-9][0-9]*$ ]]; then
    echo "BENCH_INSTANCES must be a whole number from 1, not '$instances'" >&2
    return 1
  fi
  export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
  BENCH_SERVER_URL="${BENCH_DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}"
  BENCH_URL_OPTIONS="${BENCH_DATABASE_OPTIONS:-}"
  local run_id
  run_id="$(date +%s)"
  export TOPIC_PREFIX="bench-${run_id}."
  export DATABASE_URL="$BENCH_SERVER_URL/bench_${run_id}$BENCH_URL_OPTIONS"
  export HTTP_ADDR="${HTTP_ADDR:-127.0.0.1:18080}"

  # The processes, each service's instances together, and their fixed addresses (empty: a free
  # port, chosen as it starts): checked before the build, and again before they start.
  local names
  mapfile -t names < <(services)
  local port_base="${BENCH_METRICS_PORT_BASE:-}"
  local plan_services=() plan_names=() plan_http=() plan_ops=()
  local i n
  for i in "${!names[@]}"; do
    for ((n = 1; n <= instances; n++)); do
      plan_services+=("${names[$i]}")
      if ((instances == 1)); then plan_names+=("${names[$i]}"); else plan_names+=("${names[$i]}-$n"); fi
      if ((i == 0 && n == 1)); then
        plan_http+=("$HTTP_ADDR") plan_ops+=("${OPS_HTTP_ADDR:-}")
      elif ((i > 0)) && [[ -n "$port_base" ]]; then
        plan_http+=("") plan_ops+=("127.0.0.1:$((port_base + (n - 1) * ${#names[@]} + i))")
      else
        plan_http+=("") plan_ops+=("")
      fi
    done
  done
  bench_addresses_free || return 1

  local secured="${BENCH_SECURED_KAFKA:-0}" cluster_dir="$ROOT/.run/cluster"
  if [[ $secured == 1 ]]; then
    ensure_commands curl:curl jq:jq psql:postgresql-client
    ensure_build_dependencies
    "$ROOT/scripts/postgres.sh" start
    BROKER_NODES=3 "$ROOT/scripts/broker.sh" start
    KAFKA_BROKERS="$(sed -n 's/^KAFKA_BROKERS=//p' "$cluster_dir/cluster.env")"
  else
    start_dependencies
  fi
  local profile="${BENCH_PROFILE:-release}"
  if [[ "$profile" == release ]]; then
    cargo build --release --locked --bins
  else
    cargo build --locked --bins
  fi
  if [[ $secured == 1 ]]; then
    SAGACTL="$ROOT/target/$profile/sagactl" "$ROOT/scripts/provision-kafka.sh" "$TOPIC_PREFIX" >/dev/null
    export KAFKA_CLIENT_PROPERTIES="$cluster_dir/clients/admin.properties"
  fi
  psql "$BENCH_SERVER_URL/postgres$BENCH_URL_OPTIONS" -qc "CREATE DATABASE bench_${run_id}"
  BENCH_DATABASE="bench_${run_id}"

  BENCH_LOG_DIR="$ROOT/.run/bench-$run_id"
  mkdir -p "$BENCH_LOG_DIR"
  bench_addresses_free || return 1
  # Per process: where its probes and /metrics answer, and for an orchestrator its API's
  # address, read instead when a build does not serve OPS_HTTP_ADDR.
  local bases=() api_bases=()
  local k service name extra ops http group_instance_id
  for k in "${!plan_names[@]}"; do
    service="${plan_services[$k]}" name="${plan_names[$k]}"
    ops="${plan_ops[$k]:-127.0.0.1:$(free_port)}"
    extra=()
    if [[ $service == "${names[0]}" ]]; then
      http="${plan_http[$k]:-127.0.0.1:$(free_port)}"
      extra+=("HTTP_ADDR=$http" "OPS_HTTP_ADDR=$ops")
      bases+=("http://$ops") api_bases+=("http://$http")
      if [[ -z "${API_TOKENS_FILE:-}${API_TOKENS:-}" ]] \
        && ! declare -p BENCH_ENV_orchestrator 2>/dev/null | grep -q 'API_TOKENS'; then
        extra+=("API_OPEN_ON_LOOPBACK=${API_OPEN_ON_LOOPBACK:-true}")
      fi
    else
      extra+=("METRICS_ADDR=$ops")
      bases+=("http://$ops") api_bases+=("")
    fi
    if [[ $secured == 1 ]]; then
      extra+=("KAFKA_CLIENT_PROPERTIES=$cluster_dir/clients/$service.properties")
    fi
    group_instance_id="${KAFKA_GROUP_INSTANCE_ID:-}"
    if declare -p "BENCH_ENV_$service" >/dev/null 2>&1; then
      local spec="BENCH_ENV_${service}[@]" setting
      for setting in "${!spec}"; do
        extra+=("$setting")
        [[ $setting != KAFKA_GROUP_INSTANCE_ID=* ]] || group_instance_id="${setting#*=}"
      done
    fi
    if ((instances > 1)) && [[ -n "$group_instance_id" ]]; then
      extra+=("KAFKA_GROUP_INSTANCE_ID=$group_instance_id-${name##*-}")
    fi
    # `env` executes the service in its place, so the pid is the service's.
    env "${extra[@]}" "${BENCH_SERVICES_DIR:-target/$profile}/$service" \
      >"$BENCH_LOG_DIR/$name.log" 2>&1 &
    BENCH_PIDS+=($!)
    BENCH_NAMES+=("$name")
  done

  bench_wait_ready bases api_bases || return 1
  BENCH_OPS_ADDR="${bases[0]#http://}"
  # Wait for the participants' migrations (the demo data is their last one).
  for _ in $(seq 1 300); do
    psql "$DATABASE_URL" -Atc "SELECT EXISTS (SELECT 1 FROM inventory.stock) AND EXISTS (SELECT 1 FROM payment.accounts) AND to_regclass('shipping.shipments') IS NOT NULL AND to_regclass('returns.return_lines') IS NOT NULL" 2>/dev/null | grep -q t && break
    sleep 0.1
  done

  BENCH_SAGACTL="$ROOT/target/$profile/sagactl"
  BENCH_ACCOUNTING=()
  for k in "${!BENCH_NAMES[@]}"; do
    BENCH_ACCOUNTING+=(--process "${BENCH_NAMES[$k]}=${BENCH_PIDS[$k]}" --metrics "${BENCH_NAMES[$k]}=${bases[$k]}/metrics")
  done
  # The broker and PostgreSQL (the postmaster and every backend under it) share the machine;
  # their CPU counts in the per-saga budget too.
  local broker_pid_file="$ROOT/.run/broker/broker.pid"
  if [[ $secured != 1 && -f "$broker_pid_file" ]] && kill -0 "$(cat "$broker_pid_file")" 2>/dev/null; then
    BENCH_ACCOUNTING+=(--process "broker=$(cat "$broker_pid_file")" --kafka-log-dir "$ROOT/.run/broker/data")
  fi
  if [[ $secured == 1 ]]; then
    local node node_pid
    for node in 1 2 3; do
      node_pid="$(BROKER_NODES=3 "$ROOT/scripts/broker.sh" node-pid "$node" || true)"
      [[ -z "$node_pid" ]] || BENCH_ACCOUNTING+=(--process "broker-$node=$node_pid")
    done
  fi
  local postmaster_pid
  postmaster_pid="$(head -1 /var/run/postgresql/*-main.pid 2>/dev/null || true)"
  if [[ -n "$postmaster_pid" ]]; then
    BENCH_ACCOUNTING+=(--process "postgres=$postmaster_pid")
  fi
  BENCH_ACCOUNTING+=(--sql-stats "$DATABASE_URL")
}

# bench_addresses_free: fails, naming each one and how to find who holds it, when something
# already listens on a fixed address of bench_start_stack's plan (its arrays plan_names,
# plan_http, plan_ops).
bench_addresses_free() {
  local k setting address taken=0
  for k in "${!plan_names[@]}"; do
    for setting in HTTP_ADDR OPS_HTTP_ADDR; do
      if [[ $setting == HTTP_ADDR ]]; then address="${plan_http[$k]}"; else address="${plan_ops[$k]}"; fi
      [[ -n "$address" ]] && tcp_open "$address" || continue
      [[ $setting == HTTP_ADDR || -n "${plan_http[$k]}" ]] || setting=METRICS_ADDR
      echo "${plan_names[$k]}'s $setting=$address is taken: another process listens there" \
        "(ss -ltnp | grep ':${address##*:} '); stop it or choose another address" >&2
      taken=1
    done
  done
  ((taken == 0))
}

# bench_ready URL: exit 0 when the service whose probes answer at URL (http://HOST:PORT) is
# ready: its /readyz answers 200 (it joined its group, reaches a broker and its database), or,
# for a build from before that probe (404), its /healthz does.
bench_ready() {
  local code
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1/readyz" 2>/dev/null)" || true
  [[ $code == 200 ]] && return 0
  [[ $code == 404 ]] && curl -fsS --max-time 2 "$1/healthz" >/dev/null 2>&1
}

# bench_wait_ready BASES API_BASES: waits until every process of BENCH_NAMES is ready, for
# BENCH_READY_TIMEOUT_SECS at most (BASES, API_BASES: the names of bench_start_stack's arrays).
# An orchestrator that does not answer on its OPS_HTTP_ADDR (a build from before issue 12)
# while its API's /healthz does is read there instead: its entry in BASES becomes its API's.
# Fails, with the end of the log of each process that is not ready, when one exits or the time
# runs out.
bench_wait_ready() {
  local -n ready_bases="$1" ready_api_bases="$2"
  local deadline=$((SECONDS + ${BENCH_READY_TIMEOUT_SECS:-120})) fallback_after=$((SECONDS + 5))
  local ready=() waiting k
  while :; do
    waiting=()
    for k in "${!BENCH_NAMES[@]}"; do
      ((${ready[$k]:-0})) && continue
      if bench_ready "${ready_bases[$k]}"; then
        ready[$k]=1
        continue
      fi
      if [[ -n "${ready_api_bases[$k]}" ]] && ((SECONDS >= fallback_after)) \
        && ! tcp_open "${ready_bases[$k]#http://}" \
        && curl -fsS --max-time 2 "${ready_api_bases[$k]}/healthz" >/dev/null 2>&1; then
        echo "${BENCH_NAMES[$k]} does not serve OPS_HTTP_ADDR=${ready_bases[$k]#http://} (a build" \
          "before issue 12): reading /healthz and /metrics on ${ready_api_bases[$k]#http://}" >&2
        ready_bases[$k]="${ready_api_bases[$k]}"
        ready[$k]=1
        continue
      fi
      if ! kill -0 "${BENCH_PIDS[$k]}" 2>/dev/null; then
        echo "${BENCH_NAMES[$k]} exited; the end of its log ($BENCH_LOG_DIR):" >&2
        tail -n 20 "$BENCH_LOG_DIR/${BENCH_NAMES[$k]}.log" >&2
        return 1
      fi
      waiting+=("$k")
    done
    ((${#waiting[@]} == 0)) && return 0
    if ((SECONDS >= deadline)); then
      for k in "${waiting[@]}"; do
        echo "${BENCH_NAMES[$k]} is not ready on ${ready_bases[$k]}/readyz after" \
          "${BENCH_READY_TIMEOUT_SECS:-120} s; the end of its log ($BENCH_LOG_DIR):" >&2
        tail -n 20 "$BENCH_LOG_DIR/${BENCH_NAMES[$k]}.log" >&2
      done
      return 1
    fi
    sleep 0.2
  done
}

# bench_stop_stack: stops every process bench_start_stack started and drops its database.
bench_stop_stack() {
  if ((${#BENCH_PIDS[@]})); then
    kill -TERM "${BENCH_PIDS[@]}" 2>/dev/null || true
    wait "${BENCH_PIDS[@]}" 2>/dev/null || true
    BENCH_PIDS=() BENCH_NAMES=()
  fi
  if [[ -n "$BENCH_DATABASE" ]]; then
    psql "$BENCH_SERVER_URL/postgres$BENCH_URL_OPTIONS" -qc "DROP DATABASE IF EXISTS $BENCH_DATABASE WITH (FORCE)" || true
    BENCH_DATABASE=""
  fi
}
