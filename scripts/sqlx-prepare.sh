#!/usr/bin/env bash
# The offline cache of sqlx's compile-time-checked queries (`query!` and friends), committed in
# .sqlx/ so that builds need no database: each file holds what PostgreSQL said of one
# statement (its parameter and column types, which columns may be NULL).
#
#   scripts/sqlx-prepare.sh          # rewrite .sqlx/ from the current SQL and migrations
#   scripts/sqlx-prepare.sh --check  # fail when .sqlx/ is not what the current code gives
#
# Run it after changing a `query!` or a migration. It applies every migration folder (the
# messaging tables, the participant runtime, the orchestrator, every participant) to a fresh
# scratch database, one schema, so each crate's queries see the tables they use; then it
# compiles the crates with the macros online (SQLX_OFFLINE=false, DATABASE_URL) and
# SQLX_OFFLINE_DIR, where the macros write what they learnt. .cargo/config.toml sets
# SQLX_OFFLINE=true for every other build. PostgreSQL is installed and started when missing
# (scripts/postgres.sh); the scratch database is dropped at the end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

mode=write
case "${1:-}" in
  --check) mode=check ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# The crates whose queries are checked at compile time.
MACRO_CRATES=(messaging orchestrator participant-sdk participants)
# Migration folders in the order the services apply them (messaging 1-99, participant runtime
# 100-999, then each service's own from 1000); the participants' tables do not collide, so
# one schema holds them all.
MIGRATION_DIRS=(messaging participant orchestrator)
for dir in migrations/*/; do
  dir="$(basename "$dir")"
  [[ " ${MIGRATION_DIRS[*]} " == *" $dir "* ]] || MIGRATION_DIRS+=("$dir")
done

ensure_commands psql:postgresql-client
scripts/postgres.sh start
server="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432}"
scratch="sqlx_prepare_$$"
out="$(mktemp -d)"
cleanup() {
  psql -q "$server/postgres" -c "DROP DATABASE IF EXISTS $scratch WITH (FORCE)" >/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

psql -q -v ON_ERROR_STOP=1 "$server/postgres" -c "CREATE DATABASE $scratch" >/dev/null
for dir in "${MIGRATION_DIRS[@]}"; do
  while read -r file; do
    psql -q -v ON_ERROR_STOP=1 "$server/$scratch" -f "$file" >/dev/null
  done < <(ls "migrations/$dir"/*.sql | sort -t/ -k3 -n)
done

# The macros run when their crate compiles, and cargo does not know they read the
# environment: clean those crates so that they compile again, online.
packages=()
for crate in "${MACRO_CRATES[@]}"; do packages+=(-p "$crate"); done
cargo clean --quiet "${packages[@]}"
SQLX_OFFLINE=false DATABASE_URL="$server/$scratch" SQLX_OFFLINE_DIR="$out" \
  cargo check --quiet --locked --workspace --all-targets

if [[ $mode == check ]]; then
  if ! diff -r "$out" .sqlx >&2; then
    echo ".sqlx/ is out of date: run scripts/sqlx-prepare.sh and commit .sqlx/" >&2
    exit 1
  fi
  echo ".sqlx/ matches the queries and migrations ($(ls .sqlx | wc -l) statements)" >&2
else
  rm -rf .sqlx
  mkdir .sqlx
  cp "$out"/*.json .sqlx/ 2>/dev/null || true
  echo "wrote $(ls .sqlx | wc -l) statements to .sqlx/" >&2
fi
