#!/usr/bin/env bash
# The demo: several hosts in network namespaces, each running flanneld, pods created
# through the CNI plugin, pinging and iperf3-ing each other. Run as root.
# Extra arguments go to `flannel-lab demo` (e.g. --backend host-gw --hosts 4 --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
cargo build --release --workspace --bins --quiet
exec target/release/flannel-lab demo "$@"
