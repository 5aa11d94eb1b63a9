#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, a cargo-fuzz crate outside the workspace) for
# SECONDS each (default 60), one at a time, and prints executions and coverage per
# target. Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# New corpus entries go to fuzz/target/corpus/<target>; the committed seeds in
# fuzz/corpus/<target> are read, never written. A crash fails the run and leaves
# its input in fuzz/artifacts/<target>/.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
if ! [[ "$secs" =~ ^[0-9]+$ ]]; then
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

if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "==> building ${#targets[@]} fuzz targets"
cargo +nightly fuzz build >/dev/null

logdir=target/fuzz-logs
mkdir -p "$logdir"
failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t" "corpus/$t"
  echo "==> $t for ${secs}s"
  log="$logdir/$t.log"
  rc=0
  cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
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
if ((${#failed[@]})); then
  echo "fuzz.sh: crashes in: ${failed[*]}" >&2
  exit 1
fi
