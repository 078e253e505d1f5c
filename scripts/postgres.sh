#!/usr/bin/env bash
# Installs and runs the PostgreSQL server the services and the tests use: Debian's
# `postgresql` package and its `main` cluster, listening on 127.0.0.1:5432, with trust
# authentication for TCP connections from loopback (so `postgres://postgres@127.0.0.1:5432`
# is a superuser without a password) and pg_stat_statements loaded.
#
#   scripts/postgres.sh install   # apt-get install postgresql unless a server binary is there
#   scripts/postgres.sh start     # configure and start the cluster unless a server answers
#   scripts/postgres.sh stop      # stop the cluster, fast: clients are disconnected at once
#   scripts/postgres.sh read-only # refuse writes, server-wide, keeping connections (chaos)
#   scripts/postgres.sh writable  # take writes again
#   scripts/postgres.sh running   # exit 0 when something listens on 127.0.0.1:$PGPORT
#
# TLS: the server's certificate comes from the local CA (`scripts/pki.sh issue postgres`, for
# 127.0.0.1 and localhost), so clients can check it with `sslmode=verify-full` and
# `sslrootcert=.run/pki/ca.crt`; the same CA verifies client certificates (`sslcert`/`sslkey`)
# a client presents. The services' roles (members of the group role `saga_services`, made by
# the admin step `sagactl provision database`) must come over TLS with a SCRAM password:
# the same roles without TLS, or over the Unix socket, are rejected. Every other role keeps
# trust on loopback, so `postgres://postgres@127.0.0.1:5432` stays the superuser without a
# password (the tests and the admin steps use it).
#
# The project's settings live in files of the cluster's conf.d
# (/etc/postgresql/<version>/main/conf.d/saga-engine.conf, and saga-engine-tls.conf for TLS),
# the authentication rules in saga-engine-hba.conf beside it, and the certificate, its key
# (owned by postgres, mode 600) and the CA beside them as saga-engine-server.crt,
# saga-engine-server.key and saga-engine-ca.crt; Debian's own files are left as they are.
# `start` on a running cluster applies a change of TLS or authentication with a reload (the
# server keeps its connections; PostgreSQL >= 10 reloads every TLS setting, `ssl` itself
# included) and restarts only for the settings that need it. A server that already answers on
# the port and is not Debian's is used as it is: it must accept that URL.
#
# A private server instead (the network chaos run, `sagactl chaos --network`): with PG_RUN_DIR
# set, every action acts on a server of its own in that folder (made by `start` with initdb,
# owned by postgres, so the folder must be one the postgres user can reach, such as under
# /tmp), listening on $PG_HOST:$PGPORT only, trusting $PG_TRUST_NET, its process on the network
# namespace $PG_NETNS when set (`ip netns exec`). `start` keeps the three in network.env of
# the folder, so that later calls need only PG_RUN_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PGPORT="${PGPORT:-5432}"
CLUSTER=main
if [[ -n ${PG_RUN_DIR:-} && -z ${PG_HOST:-} && -f "$PG_RUN_DIR/network.env" ]]; then
  source "$PG_RUN_DIR/network.env"
fi

server_version() {
  ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1
}

install() {
  if [[ -n "$(server_version)" && -x "/usr/lib/postgresql/$(server_version)/bin/postgres" ]]; then
    return 0
  fi
  local began=$SECONDS
  apt_install postgresql
  echo "installed PostgreSQL $(server_version) in $((SECONDS - began)) s" >&2
}

# write_if_changed FILE: writes standard input to FILE (as root) unless it holds that already;
# exit 0 when it wrote.
write_if_changed() {
  local content
  content="$(cat)"
  [[ -f "$1" && "$(cat "$1")" == "$content" ]] && return 1
  printf '%s\n' "$content" | as_root tee "$1" >/dev/null
}

# install_if_changed MODE SOURCE TARGET: copies SOURCE to TARGET, owned by postgres with MODE,
# unless TARGET holds that already; exit 0 when it copied.
install_if_changed() {
  if [[ -f "$3" ]] && cmp -s "$2" "$3"; then
    as_root chown postgres:postgres "$3"
    as_root chmod "$1" "$3"
    return 1
  fi
  # Through `env`: this script has a function named install.
  as_root env install -o postgres -g postgres -m "$1" "$2" "$3"
}

# configure VERSION: creates the cluster if it is missing and writes the project's settings.
# Sets NEEDS_RESTART=1 when a setting only a restart applies changed, NEEDS_RELOAD=1 when TLS
# or authentication changed (a reload applies them).
configure() {
  local version="$1" conf_dir="/etc/postgresql/$1/$CLUSTER"
  NEEDS_RESTART=0 NEEDS_RELOAD=0
  if [[ ! -d "$conf_dir" ]]; then
    as_root pg_createcluster "$version" "$CLUSTER" >/dev/null
  fi
  # The services' roles (group saga_services) only over TLS with a SCRAM password; the rules
  # are read top down, so theirs come before the trust rules that match every role. A group
  # that does not exist yet matches no one.
  write_if_changed "$conf_dir/saga-engine-hba.conf" <<HBA && NEEDS_RELOAD=1
# Written by scripts/postgres.sh: local development and tests only.
hostssl all   +saga_services   127.0.0.1/32  scram-sha-256
hostssl all   +saga_services   ::1/128       scram-sha-256
host    all   +saga_services   all           reject
local   all   +saga_services                 reject
local   all   all                 trust
host    all   all   127.0.0.1/32  trust
host    all   all   ::1/128       trust
HBA
  # Every end-to-end test runs four services with their own pools, several tests at once.
  write_if_changed "$conf_dir/conf.d/saga-engine.conf" <<CONF && NEEDS_RESTART=1
# Written by scripts/postgres.sh.
listen_addresses = '127.0.0.1'
port = $PGPORT
max_connections = 300
shared_buffers = 256MB
hba_file = '$conf_dir/saga-engine-hba.conf'
shared_preload_libraries = 'pg_stat_statements'
CONF
  # The server's key must belong to postgres with mode 600, so it is copied from the CA's
  # folder (which the user running the scripts owns).
  local certificate
  certificate="$("$ROOT/scripts/pki.sh" issue postgres)"
  install_if_changed 644 "$certificate" "$conf_dir/saga-engine-server.crt" && NEEDS_RELOAD=1
  install_if_changed 600 "${certificate%.crt}.key" "$conf_dir/saga-engine-server.key" && NEEDS_RELOAD=1
  install_if_changed 644 "$(dirname "$certificate")/ca.crt" "$conf_dir/saga-engine-ca.crt" && NEEDS_RELOAD=1
  write_if_changed "$conf_dir/conf.d/saga-engine-tls.conf" <<CONF && NEEDS_RELOAD=1
# Written by scripts/postgres.sh: TLS with the local CA's certificate (scripts/pki.sh).
ssl = on
ssl_cert_file = '$conf_dir/saga-engine-server.crt'
ssl_key_file = '$conf_dir/saga-engine-server.key'
ssl_ca_file = '$conf_dir/saga-engine-ca.crt'
ssl_min_protocol_version = 'TLSv1.2'
CONF
  as_root chown postgres:postgres "$conf_dir/saga-engine-hba.conf" "$conf_dir/conf.d/saga-engine-tls.conf"
  return 0
}

# reload VERSION: applies changed TLS and authentication settings to the running cluster without
# dropping a connection, after checking that the server can read them (a reload with a broken
# file would keep the old settings and only log why).
reload() {
  local version="$1" errors
  errors="$(psql -X -Atq "postgres://postgres@127.0.0.1:$PGPORT/postgres" \
    -c "SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL")"
  if [[ -n "$errors" ]]; then
    echo "saga-engine-hba.conf has errors; not reloading: $errors" >&2
    return 1
  fi
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" reload
  # The reload is asynchronous, and a certificate the server cannot load leaves the old one in
  # place with only a line in its log: wait until a client that trusts only our CA gets in.
  local ca="/etc/postgresql/$version/$CLUSTER/saga-engine-ca.crt"
  for _ in $(seq 1 100); do
    if psql -X -Atq "postgres://postgres@127.0.0.1:$PGPORT/postgres?sslmode=verify-full&sslrootcert=$ca" \
      -c "SELECT 1" >/dev/null 2>&1; then
      echo "PostgreSQL $version reloaded its TLS and authentication settings" >&2
      return 0
    fi
    sleep 0.05
  done
  echo "PostgreSQL $version does not present the CA's certificate after a reload; see /var/log/postgresql/postgresql-$version-$CLUSTER.log" >&2
  return 1
}

cluster_online() {
  pg_lsclusters --no-header 2>/dev/null | awk -v v="$1" -v c="$CLUSTER" '$1 == v && $2 == c && $4 == "online" { found = 1 } END { exit !found }'
}

start() {
  if [[ -z "$(server_version)" ]] && tcp_open "127.0.0.1:$PGPORT"; then
    echo "PostgreSQL already answers on 127.0.0.1:$PGPORT (not Debian's); using it" >&2
    return 0
  fi
  install
  local version began=$SECONDS action=start
  version="$(server_version)"
  # Installing the package may have started the cluster with Debian's settings (password
  # authentication): apply ours with a restart.
  configure "$version"
  if cluster_online "$version"; then
    if ((NEEDS_RESTART)); then
      action=restart
    else
      ((NEEDS_RELOAD)) && reload "$version"
      echo "PostgreSQL $version already runs on 127.0.0.1:$PGPORT" >&2
      return 0
    fi
  fi
  if [[ $action == start ]] && tcp_open "127.0.0.1:$PGPORT"; then
    echo "another PostgreSQL answers on 127.0.0.1:$PGPORT; using it" >&2
    return 0
  fi
  local ctl=""
  if [[ $action == restart ]]; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" restart
  else
    # pg_ctlcluster polls in half seconds and then checks the server again, which adds about
    # 2 s to a start that takes a few hundred ms; the chaos suite's restarts
    # (`sagactl chaos --postgres-restart-every-ms`) keep the server down as briefly as they
    # can. So it runs in the background, and we return as soon as the server accepts
    # connections (it ends by itself, shortly after).
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" start &
    ctl=$!
  fi
  for _ in $(seq 1 600); do
    if accepting "$version"; then
      echo "PostgreSQL $version listening on 127.0.0.1:$PGPORT (${action}ed in $((SECONDS - began)) s)" >&2
      return 0
    fi
    if [[ -n $ctl ]] && ! kill -0 "$ctl" 2>/dev/null && ! wait "$ctl"; then
      break
    fi
    sleep 0.05
  done
  echo "PostgreSQL did not start; see /var/log/postgresql/postgresql-$version-$CLUSTER.log" >&2
  return 1
}

# accepting VERSION: exit 0 when the server takes connections on 127.0.0.1:$PGPORT (not merely
# listens: a server still starting up or recovering refuses them).
accepting() {
  "/usr/lib/postgresql/$1/bin/pg_isready" -q -h 127.0.0.1 -p "$PGPORT" -t 1
}

stop() {
  local version
  version="$(server_version)"
  [[ -n "$version" ]] || return 0
  # Fast: every client is disconnected at once and its transaction rolled back (what the chaos
  # suite's restarts do to the services); no crash recovery at the next start, which
  # `-m immediate` would cost (about 2 s of syncing the data directory here).
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$CLUSTER" stop -m fast >/dev/null 2>&1 || true
}

# read-only on|off: the whole server refuses writes (SQLSTATE 25006), as a standby during a
# failover or a server on a full disk does, without dropping a connection: the chaos suite's
# --postgres-read-only-every-ms. The setting (default_transaction_read_only, through ALTER
# SYSTEM) survives a restart, so `off` removes it again; its own session is writable either way.
# A server that is down meanwhile (the chaos suite's restarts overlap) is waited for.
read_only() {
  local statement="ALTER SYSTEM RESET default_transaction_read_only" version
  [[ $1 == on ]] && statement="ALTER SYSTEM SET default_transaction_read_only = on"
  version="$(server_version)"
  for _ in $(seq 1 600); do
    accepting "$version" && break
    sleep 0.05
  done
  PGOPTIONS="-c default_transaction_read_only=off" psql -q -v ON_ERROR_STOP=1 \
    "postgres://postgres@127.0.0.1:$PGPORT/postgres" \
    -c "$statement" -c "SELECT pg_reload_conf()" >/dev/null
}

# The private server (PG_RUN_DIR).
PRIVATE_HOST="${PG_HOST:-127.0.0.1}"

# as_postgres COMMAND...: COMMAND as the postgres user (setpriv execs it).
as_postgres() {
  setpriv --reuid=postgres --regid=postgres --init-groups "$@"
}

private_start() {
  install
  local bin data="$PG_RUN_DIR/data" began=$SECONDS
  bin="/usr/lib/postgresql/$(server_version)/bin"
  mkdir -p "$PG_RUN_DIR"
  chown postgres:postgres "$PG_RUN_DIR"
  printf 'PG_HOST=%q\nPG_NETNS=%q\n' "$PRIVATE_HOST" "${PG_NETNS:-}" >"$PG_RUN_DIR/network.env"
  if [[ ! -f "$data/PG_VERSION" ]]; then
    as_postgres "$bin/initdb" -A trust -U postgres -E UTF8 --no-sync -D "$data" >"$PG_RUN_DIR/initdb.log"
    printf '%s\n' "" "# A private server (scripts/postgres.sh with PG_RUN_DIR)." \
      "listen_addresses = '$PRIVATE_HOST'" "port = $PGPORT" \
      "unix_socket_directories = '$PG_RUN_DIR'" "max_connections = 300" >>"$data/postgresql.conf"
    echo "host all all ${PG_TRUST_NET:-127.0.0.1/32} trust" >>"$data/pg_hba.conf"
  fi
  local on_host=()
  [[ -n ${PG_NETNS:-} ]] && on_host=(ip netns exec "$PG_NETNS")
  "${on_host[@]}" setpriv --reuid=postgres --regid=postgres --init-groups \
    "$bin/pg_ctl" -D "$data" -l "$PG_RUN_DIR/postgres.log" -w -t 60 start >/dev/null
  echo "PostgreSQL (private, $PG_RUN_DIR) listening on $PRIVATE_HOST:$PGPORT (started in $((SECONDS - began)) s)" >&2
}

private_stop() {
  [[ -f "$PG_RUN_DIR/data/postmaster.pid" ]] || return 0
  as_postgres "/usr/lib/postgresql/$(server_version)/bin/pg_ctl" -D "$PG_RUN_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
}

private_read_only() {
  local statement="ALTER SYSTEM RESET default_transaction_read_only"
  [[ $1 == on ]] && statement="ALTER SYSTEM SET default_transaction_read_only = on"
  # A server that is down meanwhile (restarts overlap) is waited for, as above.
  for _ in $(seq 1 600); do
    "/usr/lib/postgresql/$(server_version)/bin/pg_isready" -q -h "$PRIVATE_HOST" -p "$PGPORT" -t 1 && break
    sleep 0.05
  done
  PGOPTIONS="-c default_transaction_read_only=off" psql -q -v ON_ERROR_STOP=1 \
    "postgres://postgres@$PRIVATE_HOST:$PGPORT/postgres" \
    -c "$statement" -c "SELECT pg_reload_conf()" >/dev/null
}

if [[ -n ${PG_RUN_DIR:-} ]]; then
  case "${1:-}" in
    start) private_start ;;
    stop) private_stop ;;
    read-only) private_read_only on ;;
    writable) private_read_only off ;;
    running) tcp_open "$PRIVATE_HOST:$PGPORT" ;;
    *) echo "usage: PG_RUN_DIR=DIR $0 start|stop|read-only|writable|running" >&2; exit 2 ;;
  esac
  exit
fi

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  read-only) read_only on ;;
  writable) read_only off ;;
  running) tcp_open "127.0.0.1:$PGPORT" ;;
  *) echo "usage: $0 install|start|stop|read-only|writable|running" >&2; exit 2 ;;
esac
