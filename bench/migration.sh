#!/usr/bin/env bash
# bench/migration.sh: live migration of the test guest, hostd against QEMU in the same run.
#   - hostd: the guest hops back and forth between two VMs over the migration stream on
#     loopback TCP (examples/migration_bench.rs), HOPS times (10), 2 vCPUs and MIB (512)
#     MiB of guest RAM, idle and while it rewrites 32 MiB at 50 MiB/s; every hop's
#     heartbeats and checksums are checked;
#   - QEMU: the same guest ELF, command line, 2 vCPUs and memory (-enable-kvm -cpu
#     qemu64, -incoming tcp:127.0.0.1:PORT, QMP migrate, downtime-limit 300 ms like ours,
#     no bandwidth cap), hop for hop; downtime and total time as QEMU reports them.
# Figures: median and p99 of the hops; ratios are hostd / QEMU medians (below 1: hostd
# is faster). Needs /dev/kvm; installs QEMU from Debian (the peer) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
HOPS=${HOPS:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
. bench/lib.sh
need_qemu
cargo build -q --release -p hostd --example migration_bench
out=$("$CARGO_TARGET_DIR/release/examples/migration_bench" "$HOPS" 2 "${MIB:-512}")
echo "$out"
field() { # who scenario key
  awk -v w="$1" -v s="$2" -v k="$3" '$1=="RESULT" && $2==w && $3==s {
    for (i = 4; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) { print kv[2]; exit } } }' <<<"$out"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
grep -q '^RESULT qemu' <<<"$out" || { echo "QEMU's hops gave no result: no comparison" >&2; exit 1; }
echo "BENCH migration_downtime_ms_idle $(field hostd idle downtime_ms) ms"
echo "BENCH migration_downtime_ms_dirty $(field hostd dirty downtime_ms) ms"
for s in idle dirty; do
  echo "BENCH migration_downtime_vs_qemu_$s $(ratio "$(field hostd $s downtime_ms)" "$(field qemu $s downtime_ms)") ratio"
done
for s in idle dirty; do
  echo "BENCH migration_total_vs_qemu_$s $(ratio "$(field hostd $s total_ms)" "$(field qemu $s total_ms)") ratio"
done
