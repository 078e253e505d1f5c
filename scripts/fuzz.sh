#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while, one per core at a time, and fails when any of
# them crashes (a panic, a broken invariant, a sanitizer report, an input that hangs). Prints
# one line per target: seconds, executions, corpus size.
#
#   scripts/fuzz.sh [seconds-per-target]        (default 30)
#   scripts/fuzz.sh --build                     (only build the targets: scripts/test.sh builds
#                                                them while other phases run)
#
# cargo-fuzz is installed when missing. It needs nightly compiler flags: the `nightly` toolchain
# when rustup has it, else the default toolchain with RUSTC_BOOTSTRAP=1 (FUZZ_BOOTSTRAP=1
# chooses that even when nightly is there).
#
# The committed corpus in fuzz/corpus/<target>/ is read, not written: new inputs go to a
# scratch directory. FUZZ_GROW_CORPUS=1 adds them to fuzz/corpus/ instead (then minimise it
# with `cargo fuzz cmin <target>` before committing). FUZZ_TARGETS="a b" runs only those.
# Crashing inputs and each target's last log are kept in fuzz/artifacts/<target>/; replay one with
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

seconds="${1:-30}"
build_only=0
if [[ $seconds == --build ]]; then
  build_only=1
elif ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [seconds-per-target] | $0 --build" >&2
  exit 2
fi

# libFuzzer itself is C++, compiled by libfuzzer-sys.
ensure_commands g++:g++
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

if [[ ${FUZZ_BOOTSTRAP:-0} != 1 ]] && command -v rustup >/dev/null &&
  rustup toolchain list | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
  toolchain=nightly
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
  toolchain="$(rustc --version | cut -d' ' -f2) with RUSTC_BOOTSTRAP=1"
fi

if [[ -n ${FUZZ_TARGETS:-} ]]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <("${fuzz[@]}" list)
fi

scratch="$(mktemp -d)"
# FUZZ_REMOVE_BUILD=1 (CI) also removes the instrumented build when done: it is large and
# nothing after the fuzzers uses it.
cleanup() {
  rm -rf "$scratch"
  if [[ ${FUZZ_REMOVE_BUILD:-0} == 1 ]]; then rm -rf fuzz/target; fi
}
trap cleanup EXIT

echo "fuzz: building ${#targets[@]} targets (${toolchain})" >&2
started=$SECONDS
"${fuzz[@]}" build
echo "fuzz: built in $((SECONDS - started)) s" >&2
if ((build_only)); then
  trap - EXIT
  rm -rf "$scratch"
  exit 0
fi

# fuzz_one TARGET: runs TARGET for $seconds; its summary line goes to $scratch/TARGET.summary,
# and $scratch/TARGET.crashed exists when it crashed.
fuzz_one() {
  local target="$1" seeds="fuzz/corpus/$1" corpus log started verdict execs corp
  mkdir -p "$seeds" "fuzz/artifacts/$target"
  if [[ ${FUZZ_GROW_CORPUS:-0} == 1 ]]; then
    corpus=("$seeds")
  else
    mkdir -p "$scratch/$target"
    corpus=("$scratch/$target" "$seeds")
  fi
  log="fuzz/artifacts/$target/last-run.log"
  echo "fuzz: $target for ${seconds}s" >&2
  started=$SECONDS
  # -timeout: one input running 10 s counts as a hang; -rss_limit_mb: and 2 GB as a leak.
  if "${fuzz[@]}" run "$target" "${corpus[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -dict=fuzz/dict/json.dict -print_final_stats=1 >"$log" 2>&1; then
    verdict=ok
  else
    verdict=CRASHED
    touch "$scratch/$target.crashed"
    # The panic message (or else the sanitizer's or libFuzzer's report), and where the input
    # went.
    {
      if grep -q "panicked at" "$log"; then
        grep -m1 -A10 "panicked at" "$log"
      else
        grep -m1 -A20 -E "ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" "$log"
      fi
      grep -E "Test unit written to|^SUMMARY" "$log"
    } >&2 || true
  fi
  execs="$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)" || true
  corp="$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 | cut -d' ' -f2)" || true
  printf 'fuzz: %-22s %-7s %5ss %12s execs  corpus %s\n' \
    "$target" "$verdict" "$((SECONDS - started))" "${execs:-?}" "${corp:-?}" >"$scratch/$target.summary"
}

# One target per core at a time (FUZZ_JOBS overrides): libFuzzer runs one process, so on two
# cores two targets take the time of one, each as long as it would alone.
jobs="${FUZZ_JOBS:-$(nproc)}"
running=0
for target in "${targets[@]}"; do
  if ((running >= jobs)); then
    wait -n || true
    running=$((running - 1))
  fi
  fuzz_one "$target" &
  running=$((running + 1))
done
wait || true

failed=()
for target in "${targets[@]}"; do
  cat "$scratch/$target.summary" 2>/dev/null || echo "fuzz: $target gave no summary"
  if [[ -e $scratch/$target.crashed || ! -e $scratch/$target.summary ]]; then
    failed+=("$target")
  fi
done
if ((${#failed[@]} > 0)); then
  echo "fuzz: crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
