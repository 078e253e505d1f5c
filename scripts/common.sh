# Sourced by the scripts in this folder: the repository root, PATH with cargo, and installers
# for the Debian packages a fresh machine may lack.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

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

# tcp_open HOST:PORT: exit 0 when something accepts connections there.
tcp_open() {
  (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

# start_dependencies: the clients the scripts use, PostgreSQL and the broker on
# $KAFKA_BROKERS, each installed and started when missing. Sets STARTED_BROKER=1 when it started
# the broker (so a caller can stop it again).
start_dependencies() {
  ensure_commands curl:curl jq:jq psql:postgresql-client
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
