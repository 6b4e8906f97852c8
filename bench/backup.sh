#!/usr/bin/env bash
# bench/backup.sh: backups and images in and out (release build).
#   import_vs_qemu_img  a 2 GiB qcow2 image whose every cluster holds data: the time of
#                       `qemu-img convert -t writeback` (its own iSCSI initiator, -n
#                       --target-is-zero, flushing before it exits as vdi-import does; the
#                       better of as it comes and -W -m 16) to a new volume's iscsi://
#                       target, divided by that of `poolctl vdi-import` of the same image
#                       into a new volume of the same repository (volume creation and grant
#                       included); medians of 4 rounds taking turns; goal >= 1.0. qemu-img's
#                       default (cache unsafe: no flush at all) is printed beside it.
#                       tests/tests/images.rs.
#   backup_incremental_vs_full  `poolctl vm-backup` of a VM's 4 GiB disk whose every chunk
#                       holds data: the incremental after the guest rewrote 1% of it, as a
#                       fraction of the full backup's time; goal <= 0.05.
#                       tests/tests/backup.rs (about 13 GB in the temporary directory).
#   backup_cbt_scaling  the changed-chunk query (ListChangedChunks' walk) between two
#                       snapshots with 1% of a 4 GiB volume's chunks rewritten, on a 64 GiB
#                       volume over on a 4 GiB one: the worse of the rewrite contiguous and
#                       scattered at random; goal <= 2. storaged/examples/changed_chunks_bench.rs
#                       (about 5 GB under target/bench-cbt).
#   checkpoint_pause_ms the pause of `poolctl vm-checkpoint` of a 512 MiB test guest that
#                       rewrites 32 MiB at 50 MiB/s (memory saved, disks snapshotted),
#                       median of 3, printed next to the live migration downtime of the
#                       same guest in the same pool. tests/tests/checkpoint.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_qemu
command -v qemu-nbd >/dev/null || {
  echo "qemu-nbd is missing (qemu-utils): vdi-import reads images through it" >&2
  exit 1
}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p poold -p hostd -p storaged -p poolctl --bins
cargo test --release -q -p e2e-tests --test images --no-run

cargo test --release -q -p e2e-tests --test backup --no-run
cargo test --release -q -p e2e-tests --test checkpoint --no-run
cargo build --release -q -p storaged --example changed_chunks_bench

# Every figure first, then the table: a failure prints none of it.
imported=$(bench_line import_vs_qemu_img '^(qcow2 import |runs )' \
  cargo test --release -q -p e2e-tests --test images -- --ignored --nocapture import_vs_qemu_img)
backup=$(bench_line backup_incremental_vs_full '^backup of a ' \
  cargo test --release -q -p e2e-tests --test backup -- --ignored --nocapture backup_times_on_a_4_gib_disk)
cbt=$(bench_line backup_cbt_scaling '^(volume|[0-9]+ GiB) ' \
  cargo run --release -q -p storaged --example changed_chunks_bench "$CARGO_TARGET_DIR/bench-cbt")
pause=$(bench_line checkpoint_pause_ms '^checkpoint of a ' \
  cargo test --release -q -p e2e-tests --test checkpoint -- --ignored --nocapture checkpoint_pause_next_to_migration_downtime)
printf '%s\n' "$backup" "$cbt" "$pause" "$imported"
