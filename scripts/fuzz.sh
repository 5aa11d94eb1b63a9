#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, a cargo-fuzz crate outside the workspace) for
# SECONDS each (default 60), one at a time, and prints executions and coverage per
# target. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# New corpus entries go to fuzz/target/corpus/<target>; the committed seeds in
# fuzz/corpus/<target> are read, never written. A crash fails the run and leaves
# its input in fuzz/artifacts/<target>/.
#
# All targets come from one `cargo fuzz build`. FLANNEL_FUZZ_BUILD picks how:
#   full  (default) cargo-fuzz's own: optimised, AddressSanitizer, overflow checks;
#         for long runs (the unsafe code in flannel-udp is what ASan is for).
#   smoke unoptimised, no sanitizer (overflow checks and panics still abort): much
#         cheaper to build from cold; for scripts/test.sh's short runs in CI.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
# (0 would mean "no limit" to libFuzzer.)
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
  exit 2
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz is missing (cargo install cargo-fuzz)" >&2
  exit 1
fi

case "${FLANNEL_FUZZ_BUILD:-full}" in
  full) build=() ;;
  smoke) build=(--dev --sanitizer none) ;;
  *)
    echo "fuzz.sh: FLANNEL_FUZZ_BUILD must be full or smoke" >&2
    exit 2
    ;;
esac

if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "==> building the fuzz targets (${FLANNEL_FUZZ_BUILD:-full} build)"
start=$SECONDS
cargo +nightly fuzz build "${build[@]}" >/dev/null
echo "built in $((SECONDS - start))s"

logdir=target/fuzz-logs
mkdir -p "$logdir"
failed=()
summary=()
total=0
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t" "corpus/$t"
  echo "==> $t for ${secs}s"
  log="$logdir/$t.log"
  rc=0
  cargo +nightly fuzz run "${build[@]}" "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  total=$((total + ${execs:-0}))
  line="$t: ${execs:-?} executions, cov ${cov:-?}, ${secs}s"
  if ((rc)); then
    line+=" -- FAILED (exit $rc), see fuzz/$log and fuzz/artifacts/$t/"
    failed+=("$t")
    grep -m1 -A2 "panicked at" "$log" >&2 || tail -5 "$log" >&2
  fi
  echo "$line"
  summary+=("$line")
done

echo "==> fuzz summary"
printf '  %s\n' "${summary[@]}"
echo "  total: $total executions"
if ((${#failed[@]})); then
  echo "fuzz.sh: crashes in: ${failed[*]}" >&2
  exit 1
fi
