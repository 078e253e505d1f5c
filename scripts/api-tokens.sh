#!/usr/bin/env bash
# Makes API tokens for the orchestrator: a random token per NAME:ROLES (ROLES: comma-separated
# viewer, client, operator; default: ops:operator shop:client dashboards:viewer). Prints each
# token once on stderr (keep them; they are not stored) and the token list on stdout, as one
# line for API_TOKENS:
#
#   export API_TOKENS="$(scripts/api-tokens.sh ops:operator shop:client)"
#
# or, for API_TOKENS_FILE, one entry per line: scripts/api-tokens.sh ... | tr ';' '\n' > FILE
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
(($#)) || set -- ops:operator shop:client dashboards:viewer
list="$(mktemp)"
trap 'rm -f "$list"' EXIT
make_api_tokens "$list" "$@"
for spec in "$@"; do
  name="${spec%%:*}" variable="TOKEN_${name//-/_}"
  printf '%-16s %-24s %s\n' "$name" "(${spec#*:})" "${!variable}" >&2
done
paste -sd';' "$list"
