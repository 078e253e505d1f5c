#!/usr/bin/env bash
# The README's walkthroughs, proved on a copy of this repository (target/walkthrough/repo: this
# working tree's files, its own target directory seeded from target/debug):
#
#   walkthrough/add-a-step.patch        the loyalty step in the order saga (version 2)
#   walkthrough/add-a-saga-type.patch   the redemption saga: loyalty points traded for a
#                                       voucher (its trigger message, a step more for loyalty,
#                                       a new vouchers participant)
#
# Each patch is what a developer writes by hand. For each it lists the files the patch touches
# and fails unless the step is exactly three (its definition, its participant's code, its
# migration) and the saga type only definitions, messages (events/), participants' code and
# migrations: nothing of the engine, the scripts, the page, the API or Docker. Then it runs
# `sagactl generate` (the copy's build) and fails unless every other changed file is one the
# generator says it wrote. Then the copy's contract tests run, its services
# start as processes (scripts/common.sh's bench_start_stack, from the copy) and three sagas
# run: an order (its loyalty points awarded), a redemption of those points (a voucher issued)
# and one of more points than are left (compensated: nothing deducted, no voucher).
#
#   scripts/walkthrough.sh
#
# The copy is removed when it passes (WALKTHROUGH_KEEP=1 keeps it) and kept when it fails.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

work="$ROOT/target/walkthrough"
copy="$work/repo"
say() { echo "walkthrough: $*" >&2; }
fail() {
  say "FAILED: $*"
  exit 1
}

# The copy: every file git tracks or would track (uncommitted changes included), in a git
# repository of its own so that what each stage changed can be listed.
rm -rf "$work"
mkdir -p "$copy"
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' file; do [[ -e $file ]] && printf '%s\0' "$file"; done |
  tar --null -T - -cf - | tar -xf - -C "$copy"
# This build's artifacts, so that the copy compiles only what the patches change (the
# incremental caches are left: the copy rebuilds its own crates from scratch). Hard links, not
# copies (a third of the time, and no 2 GB written): rustc and the linker replace the artifacts
# they write with new files, which leaves this build's alone; what is written in place, cargo's
# fingerprints, is copied, and rustc's dep-info files (deps/*.d, which cargo does not read) are
# left out.
if [[ -d target/debug/deps ]]; then
  mkdir -p "$copy/target/debug"
  cp -al target/debug/deps target/debug/build "$copy/target/debug/"
  find "$copy/target/debug/deps" -name '*.d' -delete
  cp -a target/debug/.fingerprint "$copy/target/debug/"
fi
# The copy's scripts start PostgreSQL as this checkout's do, and install their local CA (.run/pki,
# scripts/pki.sh) in the server: they get this checkout's, so that the server keeps trusting
# the CA every other test here issues certificates with.
"$ROOT/scripts/postgres.sh" start
mkdir -p "$copy/.run"
cp -a .run/pki "$copy/.run/"
in_copy() { git -C "$copy" -c user.name=walkthrough -c user.email=walkthrough@invalid "$@"; }
in_copy init -q
in_copy add -A
in_copy commit -qm "the repository before the walkthrough"

# changed: the files changed since the copy's last commit, one per line.
changed() { in_copy status --porcelain --untracked-files=all | cut -c4- | sort; }

# hand_written PATCH: applies PATCH, prints its files with their kind, fails on any file
# that is no definition, message, participant code or migration; sets `written`.
hand_written() {
  in_copy apply "$ROOT/walkthrough/$1"
  mapfile -t written < <(changed)
  local file kind
  for file in "${written[@]}"; do
    case "$file" in
      sagas/*.toml) kind="definition" ;;
      events/*) kind="messages" ;;
      participants/src/bin/*.rs) kind="participant code" ;;
      migrations/*/*.sql) kind="migration" ;;
      *) fail "$1 touches $file, which is no definition, message, participant code or migration" ;;
    esac
    printf 'walkthrough:   %-17s %s\n' "$kind" "$file" >&2
  done
  in_copy add -A
  in_copy commit -qm "$1"
}

# generated: builds the copy's sagactl, runs `sagactl generate` and fails unless every file
# that changed is one it says it wrote.
generated() {
  (cd "$copy" && cargo build --locked --quiet --bin sagactl)
  local log="$work/generate.log" file
  (cd "$copy" && target/debug/sagactl generate) 2>"$log" || {
    cat "$log" >&2
    fail "sagactl generate failed"
  }
  for file in $(changed); do
    grep -qxF "wrote $file" "$log" || fail "$file changed, and sagactl generate did not write it"
    printf 'walkthrough:   %-17s %s\n' "generated" "$file" >&2
  done
  in_copy add -A
  in_copy commit -qm "sagactl generate" --allow-empty
}

say "adding a step (walkthrough/add-a-step.patch), by hand:"
hand_written add-a-step.patch
((${#written[@]} == 3)) || fail "the step touched ${#written[@]} files, not 3"
[[ $(printf '%s\n' "${written[@]}" | grep -c '^sagas/') == 1 &&
  $(printf '%s\n' "${written[@]}" | grep -c '^participants/') == 1 &&
  $(printf '%s\n' "${written[@]}" | grep -c '^migrations/') == 1 ]] ||
  fail "the step is not its definition, its participant's code and its migration"
say "then sagactl generate:"
generated

say "adding a saga type (walkthrough/add-a-saga-type.patch), by hand:"
hand_written add-a-saga-type.patch
say "then sagactl generate:"
generated

# The contract's tests: every golden example (the generated ones too) against its schema. (The
# saga core's own tests read the repository's definitions as they are, not as a walkthrough
# leaves them.)
say "the copy's contract tests"
(cd "$copy" && target/debug/sagactl generate --check &&
  cargo test --locked --quiet -p events 2>&1 | grep -E '^test result|FAILED|panicked' >&2)

say "the copy's services, as processes"
(
  # The copy's scripts, definitions and build, on a database and topic prefix of their own.
  unset SAGAS_DIR
  source "$copy/scripts/common.sh"
  cd "$ROOT"
  export HTTP_ADDR="127.0.0.1:$(free_port)" BENCH_PROFILE=debug BENCH_METRICS_PORT_BASE=9380
  trap bench_stop_stack EXIT
  bench_start_stack
  api="http://$HTTP_ADDR"
  sagactl="$ROOT/target/debug/sagactl"

  # wait_for URL STATE: polls a saga's view until its state is STATE (30 s at most).
  wait_for() {
    local state=""
    for _ in $(seq 1 300); do
      state="$(curl -fsS "$1" 2>/dev/null | jq -r .state)" || true
      [[ $state == "$2" ]] && return 0
      sleep 0.1
    done
    fail "$1 is ${state:-not there}, not $2 after 30 s"
  }
  sql() { psql "$DATABASE_URL" -Atc "$1"; }

  order_id="$("$sagactl" order --customer alice --quantity 2 --unit-price-cents 400)"
  wait_for "$api/orders/$order_id/saga" completed
  points="$(sql "SELECT points FROM loyalty.points_awarded WHERE saga_key = '$order_id'")"
  [[ $points == 800 ]] || fail "the order awarded '${points}' points, not 800"
  say "an order on version 2 completed, its loyalty step awarded $points points"

  redeem() {
    printf '{"type": "RedemptionRequested", "redemption_id": "%s", "customer_id": "alice", "points": %s}' \
      "$(cat /proc/sys/kernel/random/uuid)" "$1" | "$sagactl" start redemption
  }
  redemption="$(redeem 500)"
  wait_for "$api/definitions/redemption/sagas/$redemption" completed
  [[ $(sql "SELECT points FROM vouchers.vouchers WHERE saga_key = '$redemption'") == 500 ]] ||
    fail "the redemption of 500 points issued no voucher of 500"
  say "a redemption of 500 points completed with a voucher"

  refused="$(redeem 301)"
  wait_for "$api/definitions/redemption/sagas/$refused" compensated
  [[ $(sql "SELECT count(*) FROM loyalty.points_deducted WHERE saga_key = '$refused'") == 0 &&
    $(sql "SELECT count(*) FROM vouchers.vouchers WHERE saga_key = '$refused'") == 0 ]] ||
    fail "the refused redemption deducted points or issued a voucher"
  say "a redemption of 301 more points (300 left) was compensated, nothing deducted"
  "$sagactl" delete-topics --prefix "$TOPIC_PREFIX" >/dev/null 2>&1 || true
)

say "passed"
[[ ${WALKTHROUGH_KEEP:-0} == 1 ]] || rm -rf "$work"
