#!/usr/bin/env bash
# deploy/docker/build-image.sh: builds the image `pool-node:dev` FROM scratch, without
# pulling anything from a registry: this workspace's release binaries, the shared
# libraries they link (found with ldd on this machine) and a static busybox for the
# node's start script.
#
# Needs: a Docker engine; busybox-static (apt-get install busybox-static).
# BIN: where the binaries are (default target/release; built here if missing).
# ROOTFS=DIR: only assemble the root file system in DIR (no engine needed), e.g. to try
# it with chroot.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release}
TAG=${TAG:-pool-node:dev}
bins=(poold storaged hostd hostd-vmm poolctl)
missing=0
for b in "${bins[@]}"; do [ -x "$BIN/$b" ] || missing=1; done
if [ "$missing" = 1 ]; then
  cargo build --release -q -p poold -p storaged -p hostd -p poolctl
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { echo "busybox missing: apt-get install busybox-static" >&2; exit 1; }
# A dynamic busybox would need its libraries in the image too.
if ldd "$busybox" >/dev/null 2>&1; then
  echo "$busybox is not static: apt-get install busybox-static" >&2
  exit 1
fi

if [ -n "${ROOTFS:-}" ]; then
  root=$ROOTFS
  mkdir -p "$root"
else
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
fi
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/tmp" "$root/var/lib" "$root/etc/pool"
for b in "${bins[@]}"; do
  cp "$BIN/$b" "$root/usr/local/bin/"
  # Debug info stays in the build tree, not in the image.
  if command -v strip >/dev/null; then strip "$root/usr/local/bin/$b"; fi
  # Each shared library at the path the binary asks for (the loader included).
  ldd "$BIN/$b" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -nL "$lib" "$root$lib"
  done
done
cp "$busybox" "$root/bin/busybox"
for app in sh sleep mkdir cat; do ln -s busybox "$root/bin/$app"; done
cp deploy/docker/node.sh "$root/usr/local/bin/pool-node"
chmod +x "$root/usr/local/bin/pool-node"
cp deploy/docker/Dockerfile "$root/Dockerfile"
[ -z "${ROOTFS:-}" ] || { echo "root file system in $root"; exit 0; }
docker build -q -t "$TAG" "$root"
echo "built $TAG"
