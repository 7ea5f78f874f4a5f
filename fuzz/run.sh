#!/usr/bin/env bash
# Fuzzes every target (or those named) for a bounded time each, with libFuzzer and ASan:
#
#   fuzz/run.sh                 # every target, SECONDS_EACH (60) seconds each
#   SECONDS_EACH=300 fuzz/run.sh h1_head h1_chunked
#
# Needs a nightly toolchain and cargo-fuzz (installed when missing). New inputs that raise
# coverage go to a scratch corpus under $WORK (not to fuzz/corpus: add seeds there by hand
# when one is worth keeping); a crash stops the run, leaves its input in fuzz/artifacts/ and
# exits non-zero.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
each=${SECONDS_EACH:-60}
work=${WORK:-/tmp/lockstep-fuzz}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
cd "$here"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=($(ls fuzz_targets | sed 's/\.rs$//'))
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  echo "== $t (${each}s)"
  cargo +nightly fuzz run "$t" "$work/$t" "corpus/$t" -- -max_total_time="$each" -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::new_units_added|==[0-9]+==ERROR|SUMMARY)" || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$t: crash, input in fuzz/artifacts/$t/" >&2; exit 1; }
done
