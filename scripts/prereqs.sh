#!/usr/bin/env bash
# Installs what building and testing flannel-rs needs on Debian (run as root).
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again.
set -euo pipefail

PACKAGES=(
  etcd-server etcd-client      # a real etcd for the store tests and the lab
  protobuf-compiler libprotobuf-dev  # etcd-client's build: protoc and the well-known .proto files
  containernetworking-plugins  # bridge, host-local, loopback: the CNI delegates
  iproute2 iputils-ping iperf3 # namespaces, links, ping and throughput in the lab
  nftables iptables            # masquerade and forward rules
  wireguard-tools wireguard-go # wg and an independent WireGuard for the wireguard tests
  tcpdump                      # the wireguard test checks what is on the wire
  buildah mmdebstrap           # the container image (scripts/image.sh, tests/e2e_image.rs)
  procps kmod ca-certificates curl gcc pkg-config
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "==> installing the Rust toolchain (rustup)"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component rustfmt,clippy
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
# The lab's VXLAN and TUN paths need these kernel modules; built-in on most kernels.
for m in vxlan tun br_netfilter; do modprobe -q "$m" 2>/dev/null || true; done
