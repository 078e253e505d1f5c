#!/usr/bin/env bash
# The admin step of a secured Kafka cluster, for one deployment (one topic prefix): creates its
# topics and the ACLs of every identity (`sagactl provision kafka` works them out from the saga
# definitions; scripts/kafka-acls.py applies them with confluent-kafka and waits until every
# broker enforces them). Services then start without create rights. Safe to run again.
#
#   scripts/provision-kafka.sh [TOPIC_PREFIX]
#
# Defaults to the three-node cluster of `BROKER_NODES=3 scripts/broker.sh start`: its
# cluster.env (KAFKA_BROKERS) and admin identity. Another cluster: set KAFKA_ADMIN_PROPERTIES
# (the admin's librdkafka client.properties) and KAFKA_BROKERS (every broker: each is asked
# whether it enforces the ACLs). SAGACTL names the sagactl
# to run (default: target/debug/sagactl, built when missing). confluent-kafka (pinned) is
# installed from PyPI into .run/acl-venv on first use. PROVISION_REPLICATION_FACTOR: the
# topics' replication (default: the brokers' default.replication.factor).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFLUENT_KAFKA_VERSION=2.12.2
prefix="${1:-${TOPIC_PREFIX:-}}"
cluster_dir="${BROKER_RUN_DIR:-$ROOT/.run/cluster}"
if [[ -z "${KAFKA_ADMIN_PROPERTIES:-}" ]]; then
  # The local cluster: its brokers, whatever KAFKA_BROKERS says (test.sh sets it to the
  # plaintext broker).
  [[ -f "$cluster_dir/cluster.env" ]] || {
    echo "no $cluster_dir/cluster.env (BROKER_NODES=3 scripts/broker.sh start) and no KAFKA_ADMIN_PROPERTIES" >&2
    exit 1
  }
  source "$cluster_dir/cluster.env"
fi
: "${KAFKA_BROKERS:?KAFKA_BROKERS must name the cluster with KAFKA_ADMIN_PROPERTIES}"
admin_properties="${KAFKA_ADMIN_PROPERTIES:-$cluster_dir/clients/admin.properties}"
[[ -f "$admin_properties" ]] || { echo "no admin client properties at $admin_properties" >&2; exit 1; }

venv="$ROOT/.run/acl-venv"
if ! "$venv/bin/python" -c "import confluent_kafka, sys; sys.exit(confluent_kafka.version()[0] != '$CONFLUENT_KAFKA_VERSION')" 2>/dev/null; then
  ensure_commands python3:python3
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q "confluent-kafka==$CONFLUENT_KAFKA_VERSION"
fi

sagactl="${SAGACTL:-$ROOT/target/debug/sagactl}"
[[ -x "$sagactl" ]] || (cd "$ROOT" && cargo build --locked -p sagactl)
plan="$(mktemp)"
trap 'rm -f "$plan"' EXIT
"$sagactl" provision kafka --kafka-brokers "$KAFKA_BROKERS" --kafka-client-properties "$admin_properties" \
  --topic-prefix "$prefix" --replication-factor "${PROVISION_REPLICATION_FACTOR:--1}" --acl-plan "$plan"
"$venv/bin/python" "$ROOT/scripts/kafka-acls.py" "$plan" "$admin_properties" "$KAFKA_BROKERS"
