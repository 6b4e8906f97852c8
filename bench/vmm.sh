#!/usr/bin/env bash
# bench/vmm.sh: hostd's VMM against QEMU booting the same test guest in the same run.
#   - VM start: process start to the guest's first console line, median of RUNS (20),
#     for `hostd run`, the daemon (CreateVm(start) to console), and QEMU (microvm and pc);
#   - memory overhead per VM: VM process RSS minus the guest RAM it has touched;
#   - guest virtio-blk 4 KiB random reads on an iSCSI volume (our target on loopback) next
#     to iscsi-initiator reading the same LUN directly at the same queue depth (1 and 8,
#     taking turns for VMM_BENCH_ROUNDS rounds, 3; medians; the BENCH ratio is the worse
#     depth), and on a raw file next to host pread (information).
# Needs /dev/kvm; installs QEMU from Debian (the peer) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-20}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
. bench/lib.sh
need_qemu
cargo build -q --release -p hostd --bin hostd --bin hostd-vmm --example vmm_bench
"$CARGO_TARGET_DIR/release/examples/vmm_bench" "$CARGO_TARGET_DIR/release/hostd" "$RUNS"
