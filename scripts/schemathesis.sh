#!/usr/bin/env bash
# Property-based test of the orchestrator's HTTP API with Schemathesis: reads the OpenAPI
# document the server serves (GET /openapi.json, orchestrator/openapi.json), generates valid and
# invalid requests for every operation (examples, boundary/coverage cases, random fuzzing, and
# stateful scenarios that feed ids from one answer into the next request), and checks every
# answer: no 5xx, a documented status code, content type and headers, a body (or each
# Server-Sent Event) that matches its schema, invalid input refused, valid input taken, 405 with
# `Allow` for other methods. Settings (seed, examples per operation, the reasoned exceptions) are
# in scripts/schemathesis.toml. Exits non-zero on any failure. Loaded from the server,
# Schemathesis leaves out the operation that serves the document (GET /openapi.json: 15 of 16
# operations are tested); tests/it/operate.rs checks that the served document is the file.
#
#   API_URL=http://127.0.0.1:18090 [API_TOKEN=...] scripts/schemathesis.sh [extra schemathesis run options]
#
# It tests an orchestrator that is already running (with its PostgreSQL and broker): use its own
# database and TOPIC_PREFIX, since it places orders and moves sagas (operator actions), e.g.
#
#   psql postgres://postgres@127.0.0.1:5432/postgres -c 'CREATE DATABASE schema_test'
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/schema_test TOPIC_PREFIX=schemathesis-$RANDOM. \
#     HTTP_ADDR=127.0.0.1:18090 target/debug/orchestrator &
#
# API_TOKEN, when set, goes out as `Authorization: Bearer $API_TOKEN` with every request (it is
# handed to Schemathesis through the environment, never on a command line); every operation is
# tested, so the token needs every role that any operation asks for. A run took 45 s against a
# fresh database and up to 2 minutes against one holding about 100 unfinished sagas (two cores,
# debug build; most of it is spent on watch streams of sagas that are still running). Schemathesis is installed on first use, pinned, into a virtualenv in
# target/schemathesis-venv (needs python3 with venv and access to PyPI). The JUnit report goes to
# target/schemathesis-report/; each failure prints a curl command that reproduces it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=4.32.5
venv=target/schemathesis-venv
say() { echo "schemathesis: $*" >&2; }

if [[ -z ${API_URL:-} ]]; then
  echo "usage: API_URL=http://HOST:PORT [API_TOKEN=...] $0 [schemathesis run options]" >&2
  exit 2
fi
api_url="${API_URL%/}"

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qx "schemathesis, version $version"; then
  say "installing schemathesis $version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

# Schemathesis reads one configuration file: the committed one, plus the header when there is a
# token. `${API_TOKEN}` is resolved by Schemathesis from the environment.
config="$(mktemp)"
trap 'rm -f "$config"' EXIT
cat scripts/schemathesis.toml >"$config"
if [[ -n ${API_TOKEN:-} ]]; then
  export API_TOKEN
  # shellcheck disable=SC2016 # a Schemathesis placeholder, not a shell expansion
  printf '\n[headers]\nAuthorization = "Bearer ${API_TOKEN}"\n' >>"$config"
fi

say "testing $api_url against its $api_url/openapi.json"
started=$SECONDS
status=0
"$venv/bin/schemathesis" --config-file "$config" run "$api_url/openapi.json" \
  --url "$api_url" \
  --checks all \
  --wait-for-schema 30 \
  --no-color \
  --report junit --report-dir target/schemathesis-report \
  "$@" || status=$?
say "finished in $((SECONDS - started)) s with status $status"
exit "$status"
