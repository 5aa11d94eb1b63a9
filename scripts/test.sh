#!/usr/bin/env bash
# The whole test suite: unit and property tests, real-etcd store tests, kernel tests
# in throw-away network namespaces and end-to-end lab tests, then a smoke run of
# every fuzz target (FLANNEL_FUZZ_SECS each, default 10; 0 skips it). Run as root.
# FLANNEL_E2E=1 makes a missing prerequisite (root, etcd, a CNI plugin...) a failure
# instead of a skip; .ci/run sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh

echo "==> formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "==> building the binaries the end-to-end tests run (flanneld, flannel, flannel-lab)"
cargo build --workspace --bins --quiet

echo "==> tests"
# One test binary at a time, so the namespace labs don't all start etcd at once on
# small machines; tests inside a binary still run in parallel. e2e_image builds the
# container image from the binaries above (scripts/image.sh: about a minute, Debian
# packages from the mirror) into target/image/e2e/ and reuses it while they are unchanged.
cargo test --workspace --no-fail-fast -- --test-threads="${FLANNEL_TEST_THREADS:-2}"

# A short run of every fuzz target (issue 13): a crash on a committed seed or one
# found in these seconds fails the suite. The smoke build (unoptimised, no sanitizer)
# is the cheap one to build from cold; long runs use scripts/fuzz.sh's full build.
fuzz_secs="${FLANNEL_FUZZ_SECS:-10}"
have_nightly() { rustup run nightly rustc --version >/dev/null 2>&1; }
if [ "$fuzz_secs" = 0 ]; then
  if [ "${FLANNEL_E2E:-}" = 1 ]; then
    echo "test.sh: FLANNEL_FUZZ_SECS=0 skips the fuzz smoke, which FLANNEL_E2E=1 requires" >&2
    exit 1
  fi
  echo "==> fuzz smoke skipped (FLANNEL_FUZZ_SECS=0)"
else
  if ! have_nightly && command -v rustup >/dev/null 2>&1; then
    echo "==> installing the nightly toolchain (cargo fuzz needs it)"
    rustup toolchain install nightly --profile minimal >/dev/null || true
  fi
  if ! have_nightly; then
    if [ "${FLANNEL_E2E:-}" = 1 ]; then
      echo "test.sh: the fuzz smoke needs the nightly toolchain (rustup toolchain install nightly)" >&2
      exit 1
    fi
    echo "==> fuzz smoke skipped: no nightly toolchain (FLANNEL_E2E=1 makes this a failure)"
  else
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
      echo "==> installing cargo-fuzz"
      cargo install cargo-fuzz --locked --quiet
    fi
    echo "==> fuzz smoke: every target for ${fuzz_secs}s"
    FLANNEL_FUZZ_BUILD=smoke bash scripts/fuzz.sh "$fuzz_secs"
  fi
fi
