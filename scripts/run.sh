#!/usr/bin/env bash
# Runs the whole system on this machine and shows every saga path:
#   installs and starts PostgreSQL and the Kafka broker if needed, creates the database, builds and starts
#   the orchestrator and every participant the saga definitions name as separate processes,
#   places demo orders (happy path, stock unavailable, payment declined, shipping rejected),
#   then two returns of the happy order (refunded; refused as more than its charge, so the
#   restock is undone and the return rejected), and prints each saga's final state as read
#   from the status API. Then it keeps running until Ctrl-C.
#
#   scripts/run.sh [--exit-after-demo]
#   SECURED_KAFKA=1 scripts/run.sh   # the same on the secured three-node cluster
#   API_TLS=1 scripts/run.sh         # the API over HTTPS, its certificate from the local CA
#
# Settings (environment): DATABASE_URL (default postgres://postgres@127.0.0.1:5432/sagas),
# KAFKA_BROKERS (default 127.0.0.1:9092), HTTP_ADDR (default 127.0.0.1:8080), TOPIC_PREFIX.
# Logs go to .run/logs/.
#
# PostgreSQL: DATABASE_URL is the administrator's (a superuser). The admin step
# (`sagactl provision database`) gives each service a role of its own (saga_<service>, its
# password in .run/pg/<service>.pgpass) owning its schema in that database, and each service
# connects as its role over TLS, verifying the server's certificate against the local CA
# (sslmode=verify-full, sslrootcert=.run/pki/ca.crt), with PGPASSFILE naming its password file.
#
# SECURED_KAFKA=1: instead of the one plaintext node, the secured three-node cluster
# (`BROKER_NODES=3 scripts/broker.sh start`: TLS, SASL, ACLs, replication 3; KAFKA_BROKERS from
# its cluster.env); the admin step (scripts/provision-kafka.sh) creates the topics and ACLs of
# TOPIC_PREFIX, and each service, and sagactl as the public client, runs with its own identity
# (KAFKA_CLIENT_PROPERTIES=.run/cluster/clients/<name>.properties). The cluster keeps running
# afterwards (stop it with `BROKER_NODES=3 scripts/broker.sh stop`).
#
# The API needs bearer tokens: each run makes new ones (their hashes in .run/api-tokens, the
# orchestrator's token list) and prints them with how to use them.
#
# API_TLS=1: the API serves HTTPS with the certificate `scripts/pki.sh issue api` makes from the
# local CA (.run/pki/api.crt for 127.0.0.1 and localhost; HTTP_TLS_CERT_FILE and
# HTTP_TLS_KEY_FILE), and every client here trusts .run/pki/ca.crt (curl --cacert; sagactl's
# SAGA_API_CA_FILE). `scripts/pki.sh renew api` replaces the certificate; the orchestrator
# serves the new one within HTTP_TLS_RELOAD_MS, without a restart.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/sagas}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export HTTP_ADDR="${HTTP_ADDR:-127.0.0.1:8080}"
exit_after_demo=0
[[ "${1:-}" == "--exit-after-demo" ]] && exit_after_demo=1

secured="${SECURED_KAFKA:-0}"
cluster_dir="$ROOT/.run/cluster"
# identity NAME: sets IDENTITY to the environment that makes a process identity NAME on the
# secured cluster (nothing on the plaintext broker).
identity() {
  IDENTITY=()
  if [[ $secured == 1 ]]; then IDENTITY=("KAFKA_CLIENT_PROPERTIES=$cluster_dir/clients/$1.properties"); fi
}
if [[ $secured == 1 ]]; then
  ensure_commands curl:curl jq:jq psql:postgresql-client
  ensure_build_dependencies
  scripts/postgres.sh start
  BROKER_NODES=3 scripts/broker.sh start
  KAFKA_BROKERS="$(sed -n 's/^KAFKA_BROKERS=//p' "$cluster_dir/cluster.env")"
else
  start_dependencies
fi

db_name="${DATABASE_URL##*/}"
server_url="${DATABASE_URL%/*}"

mapfile -t service_names < <(services)
echo "building the services: ${service_names[*]}..." >&2
cargo build --release --locked "${service_names[@]/#/--bin=}" --bin=sagactl
if [[ $secured == 1 ]]; then
  SAGACTL=target/release/sagactl scripts/provision-kafka.sh "${TOPIC_PREFIX:-}"
fi

# The admin step: the database (created when missing), a role per service and its schema; each
# service then migrates its own schema with its own rights.
target/release/sagactl provision database --server "$server_url" --database "$db_name" \
  --secrets-dir .run/pg >/dev/null
# Where the services connect: the administrator's host and port, as their own roles, over TLS
# verified against the CA that signed the server's certificate (scripts/postgres.sh).
server_address="${server_url#*://}"
server_address="${server_address#*@}"
database_ca="$("$ROOT/scripts/pki.sh" dir)/ca.crt"

api_tls="${API_TLS:-0}"
if [[ $api_tls == 1 ]]; then
  api_ca="$database_ca"
  export HTTP_TLS_CERT_FILE HTTP_TLS_KEY_FILE
  HTTP_TLS_CERT_FILE="$(scripts/pki.sh issue api)"
  HTTP_TLS_KEY_FILE="${HTTP_TLS_CERT_FILE%.crt}.key"
fi

mkdir -p .run/logs
# demo-operator: the page's walkthrough (reads, operator actions, and the demo orders);
# shop: a client that only places orders; dashboards: read-only.
make_api_tokens .run/api-tokens demo-operator:operator,client shop:client dashboards:viewer
pids=()
stop_services() {
  if ((${#pids[@]})); then
    echo "stopping services..." >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap stop_services EXIT
trap 'exit 130' INT TERM
for service in "${service_names[@]}"; do
  identity "$service"
  # `env` executes the service in its place, so the pid is the service's.
  env "${IDENTITY[@]}" \
    DATABASE_URL="postgres://saga_$service@$server_address/$db_name?sslmode=verify-full&sslrootcert=$database_ca" \
    PGPASSFILE="$ROOT/.run/pg/$service.pgpass" \
    "target/release/$service" >".run/logs/$service.log" 2>&1 &
  pids+=($!)
  echo "started $service (pid $!, log .run/logs/$service.log)" >&2
done

api="http://$HTTP_ADDR"
curl_tls=()
if [[ $api_tls == 1 ]]; then
  api="https://$HTTP_ADDR"
  curl_tls=(--cacert "$api_ca")
fi
viewer=(-H "Authorization: Bearer $TOKEN_dashboards" "${curl_tls[@]}")
for _ in $(seq 1 200); do
  curl -fsS "${viewer[@]}" "$api/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "${viewer[@]}" "$api/healthz" >/dev/null || { echo "the orchestrator did not come up; see .run/logs/orchestrator.log" >&2; exit 1; }

# customer sku quantity country label
demo_orders=(
  "alice WIDGET 2 DE happy-path"
  "alice SOLDOUT 1 DE stock-unavailable"
  "carol WIDGET 1 DE payment-declined"
  "bob GADGET 1 AQ shipping-rejected"
)
order_ids=()
for spec in "${demo_orders[@]}"; do
  read -r customer sku quantity country label <<<"$spec"
  body=$(printf '{"customer_id":"%s","items":[{"sku":"%s","quantity":%d,"unit_price_cents":1000}],"total_cents":%d,"currency":"EUR","shipping_address":{"country":"%s","city":"Berlin","line1":"Unter den Linden 1","postal_code":"10117"}}' \
    "$customer" "$sku" "$quantity" $((quantity * 1000)) "$country")
  order_id=$(curl -fsS "${curl_tls[@]}" -X POST "$api/orders" -H "Authorization: Bearer $TOKEN_shop" \
    -H 'content-type: application/json' -d "$body" | jq -r .order_id)
  echo "placed $label order $order_id" >&2
  order_ids+=("$order_id:$label")
done

printf '\n%-18s %-36s %-12s %s\n' "path" "order id" "state" "steps / failure reason"
happy_order=""
for entry in "${order_ids[@]}"; do
  order_id="${entry%%:*}"; label="${entry#*:}"
  [[ "$label" == happy-path ]] && happy_order="$order_id"
  saga=""
  for _ in $(seq 1 300); do
    saga=$(curl -fsS "${viewer[@]}" "$api/orders/$order_id/saga" 2>/dev/null || true)
    state=$(jq -r '.state // empty' <<<"$saga" 2>/dev/null || true)
    [[ "$state" =~ ^(completed|compensated|failed)$ ]] && break
    sleep 0.1
  done
  jq -r --arg path "$label" \
    '[$path, .order_id, .state, ([.steps[] | "\(.name)=\(.status)"] | join(" ")) + (if .failure_reason then " | " + .failure_reason else "" end)] | @tsv' \
    <<<"$saga" | awk -F'\t' '{printf "%-18s %-36s %-12s %s\n", $1, $2, $3, $4}'
done

# Returns of the happy order (2 WIDGETs, 20.00 EUR charged), published on the `returns` topic
# as a client does: one WIDGET back for 10.00 (received, restocked, refunded), then one for
# 50.00, more than is left of the charge (the refund is refused: the restock is undone and the
# return rejected).
# label refund_cents
demo_returns=(
  "return-refunded 1000"
  "return-refused 5000"
)
return_ids=()
for spec in "${demo_returns[@]}"; do
  read -r label refund_cents <<<"$spec"
  identity client
  return_id=$(env "${IDENTITY[@]}" target/release/sagactl return --order-id "$happy_order" --customer alice \
    --sku WIDGET --quantity 1 --refund-cents "$refund_cents")
  echo "requested $label $return_id (order $happy_order)" >&2
  return_ids+=("$return_id:$label")
  # One after the other: the second one's refusal depends on what the first refunded.
  for _ in $(seq 1 300); do
    state=$(curl -fsS "${viewer[@]}" "$api/sagas?limit=50" 2>/dev/null \
      | jq -r --arg key "$return_id" '.sagas[] | select(.saga_key == $key) | .state' 2>/dev/null || true)
    [[ "$state" =~ ^(completed|compensated|failed)$ ]] && break
    sleep 0.1
  done
done
printf '\n%-18s %-36s %-12s %s\n' "path" "return id" "state" "steps / failure reason"
for entry in "${return_ids[@]}"; do
  return_id="${entry%%:*}"; label="${entry#*:}"
  curl -fsS "${viewer[@]}" "$api/sagas?limit=50" | jq -r --arg path "$label" --arg key "$return_id" \
    '.sagas[] | select(.saga_key == $key) | [$path, .saga_key, .state, ([.steps[] | "\(.name)=\(.status)"] | join(" ")) + (if .failure_reason then " | " + .failure_reason else "" end)] | @tsv' \
    | awk -F'\t' '{printf "%-18s %-36s %-12s %s\n", $1, $2, $3, $4}'
done
cat <<TOKENS

API tokens for this run (only their hashes are stored, in .run/api-tokens; new ones each run):
  demo-operator (operator, client): $TOKEN_demo_operator
  shop (client):                    $TOKEN_shop
  dashboards (viewer):              $TOKEN_dashboards

The page:  open $api/ and paste the demo-operator token (kept only in that browser tab).${api_ca:+
           (HTTPS: the browser must trust $api_ca, the local CA)}
The API:   curl ${api_ca:+--cacert $api_ca }-H "Authorization: Bearer $TOKEN_dashboards" $api/sagas
           (one saga: $api/orders/<order_id>/saga; orders: POST $api/orders with the shop token;
           returns: target/release/sagactl return --order-id <order_id> --refund-cents <cents>)
sagactl:   export SAGA_API_TOKEN=$TOKEN_demo_operator SAGA_API=$api${api_ca:+ SAGA_API_CA_FILE=$api_ca}
           target/release/sagactl list --state failed
TOKENS

if ((exit_after_demo)); then
  exit 0
fi
echo "running; press Ctrl-C to stop" >&2
wait "${pids[@]}"
