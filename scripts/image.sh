#!/usr/bin/env bash
# Builds the flanneld container image as an OCI archive (run as root):
#
#   $TARGET/image/flanneld-<version>.oci.tar   tagged docker.io/flannel-rs/flanneld:<version>
#
# ($TARGET is $CARGO_TARGET_DIR, default target/; the version is the workspace's.) The
# root filesystem is a minimal Debian made by mmdebstrap: the "essential" package set
# (minbase without apt) plus iptables, nftables and ca-certificates, since the agent
# runs iptables-save/-restore (nft and legacy variants) and nft. Docs, man pages,
# locales and iconv modules are left out, and merged /usr comes from mmdebstrap's
# merged-usr hook rather than the usrmerge package (which would pull in perl).
# flanneld and the CNI plugin `flannel` go to /opt/bin, where deploy/kube-flannel.yml
# runs and copies them from. buildah makes a one-layer image with its vfs storage
# driver in a throw-away storage root, so nothing but the archive is left behind.
# Running it again rebuilds and replaces the archive.
#
# Load it with `podman load -i <archive>` or `skopeo copy oci-archive:<archive>
# docker://<registry>/flannel-rs/flanneld:<version>`.
#
# Environment: DEBIAN_SUITE (default bookworm), DEBIAN_MIRROR (default
# http://deb.debian.org/debian), SOURCE_DATE_EPOCH (default: the last commit's time);
# IMAGE_BIN_DIR takes flanneld and flannel from there instead of a release build, and
# IMAGE_OUT names another archive path (the image test uses both).
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "image.sh: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2"; }
need buildah buildah
need mmdebstrap mmdebstrap
[ -n "${IMAGE_BIN_DIR:-}" ] || need cargo "the Rust toolchain (scripts/prereqs.sh installs it)"
need unshare util-linux
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap and buildah need it)"

# The build runs in a private mount namespace: whatever mmdebstrap or buildah mount
# goes away with it, and buildah's blob info cache (always /var/lib/containers/cache
# for root, whatever --root says) lands on a tmpfs there instead of the host.
if [ -z "${IMAGE_SH_INNER:-}" ]; then
  created=
  if [ ! -d /var/lib/containers ]; then mkdir -p /var/lib/containers; created=1; fi
  rc=0
  IMAGE_SH_INNER=1 unshare --mount --propagation private "$0" "$@" || rc=$?
  if [ -n "$created" ]; then rmdir /var/lib/containers 2>/dev/null || true; fi
  exit "$rc"
fi
mount -t tmpfs -o mode=0700,size=64m image-sh /var/lib/containers

version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml's [workspace.package]"
arch=$(dpkg --print-architecture)
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
tag="docker.io/flannel-rs/flanneld:$version"
target=${CARGO_TARGET_DIR:-target}
out=${IMAGE_OUT:-$target/image/flanneld-$version.oci.tar}
t0=$(date +%s)

if [ -n "${IMAGE_BIN_DIR:-}" ]; then
  bin=$IMAGE_BIN_DIR
else
  echo "==> building flanneld and flannel (release)"
  cargo build --release --quiet -p flanneld -p flannel-cni
  bin="$target/release"
fi
for b in flanneld flannel; do [ -x "$bin/$b" ] || die "$bin/$b missing"; done
bin=$(cd "$bin" && pwd)

mkdir -p "$(dirname "$out")"
outdir=$(cd "$(dirname "$out")" && pwd)
out="$outdir/$(basename "$out")"
work=$(mktemp -d "$outdir/.work.XXXXXX")
B=(buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
ctr=
cleanup() {
  if [ -n "$ctr" ]; then "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; fi
  # Nothing may stay mounted below the work dir when it is removed.
  awk -v d="$work" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do umount -l "$m" || true; done
  rm -rf --one-file-system "$work" "$out.part"
}
trap cleanup EXIT

echo "==> root filesystem: Debian $suite ($arch), essential + iptables nftables ca-certificates"
sources="deb $mirror $suite main
deb $mirror $suite-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $suite-security main"
if [ -n "${DEBIAN_MIRROR:-}" ]; then sources="deb $mirror $suite main"; fi
# (SOURCE_DATE_EPOCH only here: exported to cargo it would rebuild everything whose
# build script watches it.) The log is shown if it fails.
SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet --mode=root --variant=essential --architectures="$arch" \
  --include=iptables,nftables,ca-certificates \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' \
  --dpkgopt='path-exclude=/usr/lib/*/gconv/*' \
  --customize-hook='mkdir -p "$1/opt/bin" "$1/run/flannel" "$1/etc/kube-flannel"' \
  --customize-hook="copy-in $bin/flanneld $bin/flannel /opt/bin" \
  --customize-hook='chmod 0755 "$1/opt/bin/flanneld" "$1/opt/bin/flannel"' \
  --customize-hook='rm -rf "$1"/var/log/* "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/etc/machine-id "$1"/etc/hostname "$1"/etc/resolv.conf' \
  "$suite" "$work/rootfs.tar" - <<<"$sources" >"$work/mmdebstrap.log" 2>&1 ||
  { cat "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
t1=$(date +%s)

echo "==> image $tag"
ctr=$("${B[@]}" from --quiet scratch)
"${B[@]}" add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
"${B[@]}" config \
  --os linux --arch "$arch" \
  --entrypoint '["/opt/bin/flanneld"]' --cmd '' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --workingdir / \
  --label org.opencontainers.image.title=flanneld \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.description=flannel-rs: flanneld and the flannel CNI plugin" \
  "$ctr"
"${B[@]}" commit --quiet --format oci --squash --timestamp "$epoch" --disable-compression=false \
  "$ctr" "oci-archive:$out.part:$tag" >/dev/null
mv -f "$out.part" "$out"

rootfs_bytes=$(stat -c %s "$work/rootfs.tar")
echo "==> $out ($tag)"
echo "    archive $(du -h "$out" | cut -f1), root filesystem $((rootfs_bytes / 1024 / 1024)) MiB uncompressed"
echo "    $(($(date +%s) - t0)) s: binaries + root filesystem $((t1 - t0)) s, image $(($(date +%s) - t1)) s"
