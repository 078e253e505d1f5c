#!/usr/bin/env bash
# Browser test of the operations page against the real system: builds the debug binaries,
# starts PostgreSQL and the broker if needed, a fresh database and topic prefix, the orchestrator and the
# three participants as separate processes, then drives the page in headless Chromium with
# web-tests/saga-page.mjs (Playwright). Screenshots go to target/artifacts/.
#
#   scripts/browser-test.sh
#
# Needs Node 20+ and npm; installs Chromium with apt-get when /usr/bin/chromium is missing
# (CHROMIUM=/path/to/chrome uses another). HTTP_ADDR defaults to a free loopback port.
# Removes its database and stops what it started.
#
# The API is served over HTTPS, as a deployment serves it: a CA of this run's own
# (`scripts/pki.sh`, in the run's log folder) signs its certificate, and the browser trusts that
# CA as a person's browser trusts a company's: in the NSS database of the home folder it runs
# with (certutil, from Debian's libnss3-tools, installed when missing); Node's own requests
# trust it through NODE_EXTRA_CA_CERTS. BROWSER_TLS=0 serves plain HTTP instead.
#
# The orchestrator gets a token list of two fresh random tokens: `page-operator` (operator,
# client) for the walkthrough and `page-viewer` (viewer) for what a viewer may not do. The
# payment service refuses its first compensation and the orchestrator gives up after one
# attempt, so that one saga is `failed` for the page's operator retry.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
server_url="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
# The time and our pid: runs of other sessions on the same PostgreSQL and broker never share a
# database, topics or consumer groups.
run_id="$(date +%s)_$$"
database="browser_${run_id}"
export TOPIC_PREFIX="browser-${run_id}."
export DATABASE_URL="$server_url/$database"
export RUST_LOG="${RUST_LOG:-info}"
# The participants' /metrics on ports of their own (nobody reads them here), not the fixed
# defaults another deployment on this machine may hold.
export METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:0}"
log_dir=".run/browser-$run_id"
artifact_dir="$ROOT/target/artifacts"
chromium="${CHROMIUM:-/usr/bin/chromium}"

say() { echo "browser-test: $*" >&2; }

pids=()
broker_started=false
database_created=false
cleanup() {
  local status=$?
  set +e
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null
    # Give them the graceful shutdown they promise, then make sure.
    for _ in $(seq 1 100); do
      kill -0 "${pids[@]}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null
    wait "${pids[@]}" 2>/dev/null
  fi
  if [[ $database_created == true ]]; then
    psql "$server_url/postgres" -qc "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null
    target/debug/sagactl delete-topics --prefix "$TOPIC_PREFIX" >/dev/null 2>&1
  fi
  if [[ $broker_started == true ]]; then
    BROKER_ADDR="$KAFKA_BROKERS" scripts/broker.sh stop
  fi
  if ((status != 0)); then
    say "FAILED (exit $status); logs in $log_dir/"
  fi
  exit "$status"
}
trap cleanup EXIT

print_logs() {
  for service in $(services); do
    if [[ -f "$log_dir/$service.log" ]]; then
      echo "----- $service (last 40 lines of $log_dir/$service.log) -----" >&2
      tail -n 40 "$log_dir/$service.log" >&2
    fi
  done
}

# The browser and the test's dependencies.
if [[ -n ${CHROMIUM:-} && ! -x $CHROMIUM ]]; then
  say "CHROMIUM=$CHROMIUM is not an executable"
  exit 1
fi
if [[ ! -x "$chromium" ]]; then
  say "installing Chromium with apt-get"
  apt_install chromium
fi
tls="${BROWSER_TLS:-1}"
if [[ $tls == 1 ]]; then
  ensure_commands certutil:libnss3-tools openssl:openssl
fi
if [[ ! -d web-tests/node_modules/playwright-core ]]; then
  say "installing the test's npm dependencies"
  (cd web-tests && npm ci --no-audit --no-fund)
fi

if [[ -z ${HTTP_ADDR:-} ]]; then
  # The health check below fails with the orchestrator's log, should another process take
  # the port first.
  HTTP_ADDR="127.0.0.1:$(free_port)"
fi
export HTTP_ADDR

# The broker, the binaries, the database.
start_dependencies
[[ $STARTED_BROKER == 0 ]] || broker_started=true
cargo build --locked --bins
if tcp_open "$HTTP_ADDR"; then
  say "something already listens on $HTTP_ADDR; set HTTP_ADDR to a free address"
  exit 1
fi
psql "$server_url/postgres" -qc "CREATE DATABASE $database"
database_created=true

mkdir -p "$log_dir" "$artifact_dir"

# The API tokens: random, for this run only. The orchestrator reads their hashes from a file
# (API_TOKENS_FILE, exported by make_api_tokens); the test gets the tokens themselves through
# its environment.
make_api_tokens "$log_dir/api-tokens" page-operator:operator,client page-viewer:viewer
operator_token="$TOKEN_page_operator"
viewer_token="$TOKEN_page_viewer"

api="http://$HTTP_ADDR"
curl_tls=()
browser_env=()
if [[ $tls == 1 ]]; then
  pki="$ROOT/$log_dir/pki"
  export HTTP_TLS_CERT_FILE HTTP_TLS_KEY_FILE
  HTTP_TLS_CERT_FILE="$(PKI_DIR="$pki" scripts/pki.sh issue api)"
  HTTP_TLS_KEY_FILE="$pki/api.key"
  api="https://$HTTP_ADDR"
  curl_tls=(--cacert "$pki/ca.crt")
  # The browser's home: an NSS database that trusts the run's CA for servers.
  browser_home="$ROOT/$log_dir/browser-home"
  mkdir -p "$browser_home/.pki/nssdb"
  certutil -N -d "sql:$browser_home/.pki/nssdb" --empty-password
  certutil -A -d "sql:$browser_home/.pki/nssdb" -n "saga-engine test CA" -t "C,," -i "$pki/ca.crt"
  browser_env=(HOME="$browser_home" NODE_EXTRA_CA_CERTS="$pki/ca.crt")
fi

for service in $(services); do
  case $service in
    orchestrator) settings=(COMPENSATION_MAX_ATTEMPTS=1) ;;
    payment) settings=(FAULT_COMPENSATION_FAILURES=1) ;;
    *) settings=() ;;
  esac
  env "${settings[@]}" "target/debug/$service" >"$log_dir/$service.log" 2>&1 &
  pids+=($!)
done

# /healthz on the API's address needs a token that may read.
healthy=false
for _ in $(seq 1 300); do
  if curl -fsS "${curl_tls[@]}" -o /dev/null -H "Authorization: Bearer $viewer_token" "$api/healthz" 2>/dev/null; then
    healthy=true
    break
  fi
  sleep 0.1
done
if [[ $healthy != true ]]; then
  say "the orchestrator did not answer $api/healthz within 30 s"
  print_logs
  exit 1
fi
# Wait for the participants' migrations (the demo data is their last one).
ready=false
for _ in $(seq 1 300); do
  if psql "$DATABASE_URL" -Atc "SELECT EXISTS (SELECT 1 FROM inventory.stock) AND EXISTS (SELECT 1 FROM payment.accounts) AND to_regclass('shipping.shipments') IS NOT NULL" 2>/dev/null | grep -q t; then
    ready=true
    break
  fi
  sleep 0.1
done
if [[ $ready != true ]]; then
  say "the participants' demo data did not appear within 30 s"
  print_logs
  exit 1
fi

say "running web-tests/saga-page.mjs against $api"
if ! env "${browser_env[@]}" SAGA_API="$api" SAGA_TOKEN="$operator_token" SAGA_TOKEN_NAME=page-operator \
  SAGA_VIEWER_TOKEN="$viewer_token" ARTIFACT_DIR="$artifact_dir" CHROMIUM="$chromium" \
  node web-tests/saga-page.mjs; then
  print_logs
  exit 1
fi
say "passed; screenshots in $artifact_dir/"
