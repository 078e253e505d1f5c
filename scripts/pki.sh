#!/usr/bin/env bash
# A local certificate authority for the secured setups: the Kafka nodes, PostgreSQL with TLS,
# client certificates for mutual TLS, and the services that verify them. For this machine and
# for tests only: the CA's key sits unencrypted beside its certificate.
#
#   scripts/pki.sh ca                  # create the CA unless it exists; prints its certificate's path
#   scripts/pki.sh issue NAME [SAN]    # a key and certificate for NAME, signed by the CA (unless
#                                      # they exist); SAN defaults to IP:127.0.0.1,DNS:localhost
#   scripts/pki.sh renew NAME [SAN]    # a new key and certificate for NAME in place of the old
#                                      # ones: each file replaced whole, the key first, so that
#                                      # a server that reloads them (the orchestrator's API)
#                                      # never reads half a file
#   scripts/pki.sh dir                 # prints the folder
#
# The orchestrator's HTTPS API uses `issue api` (HTTP_TLS_CERT_FILE=.run/pki/api.crt,
# HTTP_TLS_KEY_FILE=.run/pki/api.key; `API_TLS=1 scripts/run.sh` does it), and its clients
# trust ca.crt (curl --cacert, sagactl's SAGA_API_CA_FILE, Python's REQUESTS_CA_BUNDLE).
#
# Files go to $PKI_DIR (default .run/pki): ca.crt and ca.key; NAME.crt and NAME.key (PEM; the
# key PKCS#8, unencrypted, mode 600); NAME.p12 (a PKCS#12 keystore of the key and certificate
# for Java) and truststore.p12 (the CA for Java), both locked with the password in
# keystore.password. The subject is CN=NAME; every certificate is good for both server and
# client authentication (the Kafka nodes are both to each other) for 825 days, from a day before
# it was made: a host whose clock runs behind (the network chaos run sets one ten minutes back)
# accepts a certificate made a moment ago. `openssl ca` signs them (its records: index.txt and
# ca.srl beside the CA), as `openssl x509 -req` of OpenSSL 3.0 cannot set the start.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PKI_DIR="${PKI_DIR:-$ROOT/.run/pki}"

# sign CSR OUT EXTENSIONS [-selfsign]: OUT, the certificate of CSR with EXTENSIONS (lines of an
# extension section), signed by the CA's key, valid from a day ago for 825 days.
sign() {
  local csr="$1" out="$2" extensions="$3" config="$PKI_DIR/ca.cnf"
  shift 3
  mkdir -p "$PKI_DIR/issued"
  touch "$PKI_DIR/index.txt"
  [[ -s "$PKI_DIR/ca.srl" ]] || od -An -tx1 -N8 /dev/urandom | tr -d ' \n' >"$PKI_DIR/ca.srl"
  printf '%s\n' "[ca]" "default_ca = local" "[local]" "database = $PKI_DIR/index.txt" \
    "new_certs_dir = $PKI_DIR/issued" "serial = $PKI_DIR/ca.srl" "default_md = sha256" \
    "policy = any" "unique_subject = no" "copy_extensions = none" "[any]" "commonName = supplied" \
    "[extensions]" "$extensions" >"$config"
  local cert=()
  [[ ${1:-} == -selfsign ]] || cert=(-cert "$PKI_DIR/ca.crt")
  openssl ca -batch -config "$config" -keyfile "$PKI_DIR/ca.key" "${cert[@]}" "$@" -notext \
    -startdate "$(date -u -d '1 day ago' +%Y%m%d%H%M%SZ)" -days 825 -extensions extensions \
    -in "$csr" -out "$out" 2>/dev/null
}

ca() {
  ensure_commands openssl:openssl
  mkdir -p "$PKI_DIR"
  if [[ ! -f "$PKI_DIR/ca.crt" ]]; then
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI_DIR/ca.key" 2>/dev/null)
    openssl req -new -key "$PKI_DIR/ca.key" -subj "/CN=saga-engine local CA" -out "$PKI_DIR/ca.csr"
    sign "$PKI_DIR/ca.csr" "$PKI_DIR/ca.crt.tmp" \
      "$(printf '%s\n' "basicConstraints=critical,CA:TRUE" "keyUsage=critical,keyCertSign,cRLSign" \
        "subjectKeyIdentifier=hash")" -selfsign
    rm -f "$PKI_DIR/ca.csr"
    mv "$PKI_DIR/ca.crt.tmp" "$PKI_DIR/ca.crt"
  fi
  if [[ ! -f "$PKI_DIR/keystore.password" ]]; then
    (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$PKI_DIR/keystore.password")
  fi
  if [[ ! -f "$PKI_DIR/truststore.p12" ]] && command -v keytool >/dev/null; then
    keytool -importcert -noprompt -alias saga-engine-ca -file "$PKI_DIR/ca.crt" \
      -keystore "$PKI_DIR/truststore.p12.tmp" -storetype PKCS12 \
      -storepass "$(cat "$PKI_DIR/keystore.password")" >/dev/null 2>&1
    mv "$PKI_DIR/truststore.p12.tmp" "$PKI_DIR/truststore.p12"
  fi
}

# issue NAME [SAN]: NAME's key, certificate and PKCS#12 keystore, made once.
issue() {
  local name="$1" san="${2:-IP:127.0.0.1,DNS:localhost}"
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || {
    echo "certificate name must be [A-Za-z0-9._-]+, not $name" >&2
    return 2
  }
  ca >/dev/null
  local base="$PKI_DIR/$name"
  if [[ ! -f "$base.crt" ]]; then
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$base.key" 2>/dev/null)
    openssl req -new -key "$base.key" -subj "/CN=$name" -out "$base.csr"
    sign "$base.csr" "$base.crt.tmp" "$(printf '%s\n' "subjectAltName=$san" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth,clientAuth" \
      "authorityKeyIdentifier=keyid")"
    rm -f "$base.csr"
    mv "$base.crt.tmp" "$base.crt"
  fi
  if [[ ! -f "$base.p12" ]]; then
    (umask 077 && openssl pkcs12 -export -in "$base.crt" -inkey "$base.key" -certfile "$PKI_DIR/ca.crt" \
      -name "$name" -out "$base.p12" -passout "file:$PKI_DIR/keystore.password")
  fi
  echo "$base.crt"
}

# renew NAME [SAN]: `issue` in a folder of its own beside (a copy of the CA and its records),
# then the new files moved over NAME's, the key first, and the CA's records back.
renew() {
  local name="$1" fresh records=(ca.srl index.txt)
  ca >/dev/null
  fresh="$(mktemp -d "$PKI_DIR/renew.XXXXXX")"
  trap 'rm -rf "$fresh"' RETURN
  cp -p "$PKI_DIR/ca.crt" "$PKI_DIR/ca.key" "$PKI_DIR/keystore.password" "$fresh/"
  for file in "${records[@]}"; do [[ ! -f "$PKI_DIR/$file" ]] || cp -p "$PKI_DIR/$file" "$fresh/"; done
  (PKI_DIR="$fresh" && issue "$name" "${2:-}" >/dev/null)
  for file in "${records[@]}"; do [[ ! -f "$fresh/$file" ]] || cp -p "$fresh/$file" "$PKI_DIR/"; done
  mv "$fresh/$name.key" "$PKI_DIR/$name.key"
  mv "$fresh/$name.crt" "$PKI_DIR/$name.crt"
  mv "$fresh/$name.p12" "$PKI_DIR/$name.p12"
  echo "$PKI_DIR/$name.crt"
}

case "${1:-}" in
  ca) ca && echo "$PKI_DIR/ca.crt" ;;
  issue) [[ $# -ge 2 ]] || { echo "usage: $0 issue NAME [SAN]" >&2; exit 2; }; issue "$2" "${3:-}" ;;
  renew) [[ $# -ge 2 ]] || { echo "usage: $0 renew NAME [SAN]" >&2; exit 2; }; renew "$2" "${3:-}" ;;
  dir) echo "$PKI_DIR" ;;
  *) echo "usage: $0 ca|issue NAME [SAN]|renew NAME [SAN]|dir" >&2; exit 2 ;;
esac
