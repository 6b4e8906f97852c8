#!/usr/bin/env bash
# bench/backup.sh: backups and images in and out (release build).
#   import_vs_qemu_img  a 2 GiB qcow2 image whose every cluster holds data: the time of
#                       `qemu-img convert` (its own iSCSI initiator, -n --target-is-zero; the
#                       better of as it comes and -W -m 16) to a new volume's iscsi:// target,
#                       divided by that of `poolctl vdi-import` of the same image into a new
#                       volume of the same repository (volume creation and grant included);
#                       goal >= 1.0. tests/tests/images.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_qemu
command -v qemu-nbd >/dev/null || {
  echo "qemu-nbd is missing (qemu-utils): vdi-import reads images through it" >&2
  exit 1
}
qemu-img --help | grep -qw iscsi || {
  echo "qemu-img has no iscsi driver (qemu-block-extra): nothing to compare against" >&2
  exit 1
}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p poold -p hostd -p storaged -p poolctl --bins
cargo test --release -q -p e2e-tests --test images --no-run

out=$(cargo test --release -q -p e2e-tests --test images -- --ignored --nocapture import_vs_qemu_img 2>&1) || {
  echo "$out" | tail -40 >&2
  echo "the import benchmark failed" >&2
  exit 1
}
echo "$out" | grep '^qcow2 import ' >&2 || true
line=$(echo "$out" | grep '^BENCH import_vs_qemu_img ' || true)
if [ -z "$line" ]; then
  echo "$out" | tail -20 >&2
  echo "no import_vs_qemu_img figure" >&2
  exit 1
fi
echo "$line"
