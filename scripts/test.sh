#!/usr/bin/env bash
# The whole test suite: unit and property tests, real-etcd store tests, kernel tests
# in throw-away network namespaces and end-to-end lab tests. Run as root.
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
