#!/usr/bin/env bash
# Builds the release tarball for this machine's architecture:
#
#   $TARGET/dist/flannel-rs-<version>-linux-<arch>.tar.gz          (and .sha256)
#
# ($TARGET is $CARGO_TARGET_DIR, default target/.) It holds one directory
# flannel-rs-<version>-linux-<arch>/ with flanneld, the CNI plugin flannel, the
# systemd unit (deploy/flanneld.service), the Kubernetes manifest
# (deploy/kube-flannel.yml), README.md and LICENSE. File times are the last
# commit's (or SOURCE_DATE_EPOCH), owners root, so the same tree gives the same
# bytes. Running it again replaces both files; nothing else is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "release.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2"; }
need cargo "the Rust toolchain (scripts/prereqs.sh installs it)"
need tar tar
need gzip gzip
need sha256sum coreutils

version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml's [workspace.package]"
case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  armv7l) arch=arm ;;
  ppc64le) arch=ppc64le ;;
  s390x) arch=s390x ;;
  riscv64) arch=riscv64 ;;
  *) die "unknown machine $(uname -m)" ;;
esac
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
target=${CARGO_TARGET_DIR:-target}
name="flannel-rs-$version-linux-$arch"

echo "==> building flanneld and flannel (release)"
cargo build --release --quiet -p flanneld -p flannel-cni

mkdir -p "$target/dist"
dist=$(cd "$target/dist" && pwd)
stage=$(mktemp -d "$dist/.stage.XXXXXX")
trap 'rm -rf --one-file-system "$stage" "$dist/$name.tar.gz.part"' EXIT

mkdir "$stage/$name"
install -m 0755 "$target/release/flanneld" "$target/release/flannel" "$stage/$name/"
install -m 0644 deploy/flanneld.service deploy/kube-flannel.yml README.md LICENSE "$stage/$name/"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
  -C "$stage" -cf - "$name" | gzip -9 -n >"$dist/$name.tar.gz.part"
mv -f "$dist/$name.tar.gz.part" "$dist/$name.tar.gz"
(cd "$dist" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")

echo "==> $dist/$name.tar.gz ($(du -h "$dist/$name.tar.gz" | cut -f1))"
cat "$dist/$name.tar.gz.sha256"
