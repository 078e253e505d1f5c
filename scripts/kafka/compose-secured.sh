#!/usr/bin/env bash
# The secured three-node cluster of docker-compose.secured.yml, run inside its containers (the
# apache/kafka image; the repository's scripts/ and sagas/ mounted read-only, the secrets in
# $SECURED_DIR, a host folder). The same cluster as `BROKER_NODES=3 scripts/broker.sh` on this
# machine (scripts/kafka/cluster.properties), on the compose network's host names.
#
#   compose-secured.sh init     # once: CA and node keystores (keytool), a password per identity,
#                               # each node's server.properties, each identity's
#                               # clients/NAME/client.properties, the admin's Java properties
#   compose-secured.sh node N   # format node N on first start (SCRAM users included), run it
#   compose-secured.sh acls     # apply acls.txt (`sagactl provision kafka --acl-plan-format
#                               # kafka-acls`) with kafka-acls.sh; wait until every node lists them
#
# Identities: admin, the orchestrator, every participant the saga definitions name (`services`
# in scripts/common.sh) and client. Files for the services belong to uid 10001 (the saga image's
# user), the nodes' to uid 1000 (apache/kafka's).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../common.sh"
SECURED_DIR="${SECURED_DIR:-/secured}"
KAFKA_HOME="${KAFKA_HOME:-/opt/kafka}"
NODES=(1 2 3)
SAGA_UID=10001
KAFKA_UID=1000

identities() {
  echo admin
  services
  echo client
}

secret() {
  local file="$SECURED_DIR/secrets/$1.password"
  [[ -f "$file" ]] || (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$file")
  cat "$file"
}

init() {
  local pki="$SECURED_DIR/pki" store name n plain_users=""
  (umask 077 && mkdir -p "$pki" "$SECURED_DIR/secrets" "$SECURED_DIR/clients")
  store="$(secret keystore)"
  if [[ ! -f "$pki/ca.crt" ]]; then
    keytool -genkeypair -alias ca -dname "CN=saga-engine compose CA" -ext bc:c -keyalg EC \
      -groupname secp256r1 -validity 825 -keystore "$pki/ca.p12" -storetype PKCS12 -storepass "$store"
    keytool -exportcert -alias ca -rfc -keystore "$pki/ca.p12" -storepass "$store" >"$pki/ca.crt"
    keytool -importcert -noprompt -alias ca -file "$pki/ca.crt" -keystore "$pki/truststore.p12" \
      -storetype PKCS12 -storepass "$store"
  fi
  for n in "${NODES[@]}"; do
    [[ -f "$pki/kafka-$n.p12" ]] && continue
    keytool -genkeypair -alias "kafka-$n" -dname "CN=kafka-$n" -keyalg EC -groupname secp256r1 \
      -validity 825 -keystore "$pki/kafka-$n.p12" -storetype PKCS12 -storepass "$store"
    keytool -certreq -alias "kafka-$n" -keystore "$pki/kafka-$n.p12" -storepass "$store" \
      | keytool -gencert -alias ca -keystore "$pki/ca.p12" -storepass "$store" -validity 825 -rfc \
        -ext "san=dns:kafka-$n,dns:localhost" -ext "eku=serverAuth,clientAuth" >"$pki/kafka-$n.crt"
    keytool -importcert -noprompt -alias ca -file "$pki/ca.crt" -keystore "$pki/kafka-$n.p12" -storepass "$store"
    keytool -importcert -noprompt -alias "kafka-$n" -file "$pki/kafka-$n.crt" -keystore "$pki/kafka-$n.p12" -storepass "$store"
  done

  for name in $(identities); do
    plain_users+=" user_$name=\"$(secret "$name")\""
    # One folder per identity, mounted into that service only: its properties and the CA.
    mkdir -p "$SECURED_DIR/clients/$name"
    cp "$pki/ca.crt" "$SECURED_DIR/clients/$name/ca.crt"
    (umask 077 && printf '%s\n' "security.protocol=SASL_SSL" "sasl.mechanism=SCRAM-SHA-512" \
      "sasl.username=$name" "sasl.password=$(secret "$name")" \
      "ssl.ca.location=/run/kafka-client/ca.crt" >"$SECURED_DIR/clients/$name/client.properties")
    chown -R "$SAGA_UID:$SAGA_UID" "$SECURED_DIR/clients/$name"
  done
  (umask 077 && printf '%s\n' "security.protocol=SASL_SSL" "sasl.mechanism=SCRAM-SHA-512" \
    "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"$(secret admin)\";" \
    "ssl.truststore.type=PKCS12" "ssl.truststore.location=$pki/truststore.p12" \
    "ssl.truststore.password=$store" >"$SECURED_DIR/admin.java.properties")

  [[ -f "$SECURED_DIR/cluster.id" ]] || head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$SECURED_DIR/cluster.id"
  for n in "${NODES[@]}"; do
    mkdir -p "$SECURED_DIR/node-$n"
    (umask 077
      { cat "$HERE/server.properties" "$HERE/cluster.properties"
        printf '%s\n' "" "# Node $n (scripts/kafka/compose-secured.sh)" "node.id=$n" \
          "log.dirs=/var/lib/kafka/data" \
          "controller.quorum.voters=1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093" \
          "listeners=CLIENT://:9094,INTERNAL://:9095,CONTROLLER://:9093" \
          "advertised.listeners=CLIENT://kafka-$n:9094,INTERNAL://kafka-$n:9095" \
          "super.users=User:admin;User:kafka-1;User:kafka-2;User:kafka-3" \
          "ssl.keystore.location=$pki/kafka-$n.p12" "ssl.keystore.password=$store" \
          "ssl.truststore.location=$pki/truststore.p12" "ssl.truststore.password=$store" \
          "listener.name.client.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;"
      } >"$SECURED_DIR/node-$n/server.properties")
  done
  # The nodes read the passwords too: the SCRAM users are created when a node is formatted.
  chown -R "$KAFKA_UID:$KAFKA_UID" "$pki" "$SECURED_DIR"/node-* "$SECURED_DIR/secrets" "$SECURED_DIR/admin.java.properties"
  chmod 755 "$SECURED_DIR" "$SECURED_DIR/clients"
}

node() {
  local n="$1" config="$SECURED_DIR/node-$1/server.properties" args name
  if [[ ! -f /var/lib/kafka/data/meta.properties ]]; then
    # The SCRAM credentials go through a Java argument file, not the process list.
    args="$(mktemp)"
    { printf '%s\n' kafka.tools.StorageTool format -t "$(cat "$SECURED_DIR/cluster.id")" -c "$config"
      for name in $(identities); do
        printf '%s\n' --add-scram "SCRAM-SHA-512=[name=$name,password=$(secret "$name")]" \
          --add-scram "SCRAM-SHA-256=[name=$name,password=$(secret "$name")]"
      done
    } >"$args"
    java -cp "$KAFKA_HOME/libs/*" "@$args"
    rm -f "$args"
  fi
  exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$config"
}

acls() {
  local wanted line n listed
  wanted="$(grep -c -- --add "$SECURED_DIR/acls.txt")"
  while read -r line; do
    # shellcheck disable=SC2086 # one binding's arguments, split on purpose
    "$KAFKA_HOME/bin/kafka-acls.sh" --bootstrap-server kafka-1:9094 \
      --command-config "$SECURED_DIR/admin.java.properties" $line >/dev/null
  done <"$SECURED_DIR/acls.txt"
  # ACLs apply on each node asynchronously: wait until each lists them all.
  for n in "${NODES[@]}"; do
    for _ in $(seq 1 60); do
      listed="$("$KAFKA_HOME/bin/kafka-acls.sh" --bootstrap-server "kafka-$n:9094" \
        --command-config "$SECURED_DIR/admin.java.properties" --list | grep -c 'principal=' || true)"
      ((listed >= wanted)) && break
      sleep 1
    done
  done
  echo "$wanted ACLs applied"
}

case "${1:-}" in
  init) init ;;
  node) [[ "${2:-}" =~ ^[123]$ ]] || { echo "usage: $0 node 1|2|3" >&2; exit 2; }; node "$2" ;;
  acls) acls ;;
  *) echo "usage: $0 init|node N|acls" >&2; exit 2 ;;
esac
