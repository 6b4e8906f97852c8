#!/usr/bin/env bash
# bench/net.sh: the guest network, hostd's virtio-net against QEMU's userspace virtio-net
# (`virtio-net-device` on `-M microvm,acpi=off`, `-netdev tap,vhost=off`: this kernel has
# no vhost-net), the same test guest ELF, command line and tap set-up, one VM at a time,
# taking turns, each VMM in a network namespace of its own (hostd/examples/net_bench.rs):
#   - guest -> host UDP datagrams/s at 64-byte payloads and payload MB/s at 1,448 bytes,
#     counted by a socket in the namespace from the first to the last datagram's kernel
#     receive time, median of RUNS (5) boots each way;
#   - host -> guest -> host UDP echo round trip, p50 and p99 of RUNS x 400 sequential
#     round trips after a warm-up (and of hostd with its VIF's busy polling off, for
#     reference: net_rtt_p50_nopoll_vs_qemu, and its streams in the table);
#   - echoes lost at 1,000 pps over one live migration between two taps on one bridge
#     (ours; QEMU's with its self-announce for reference).
# Ratios are hostd / QEMU: above 1 is better for packets/s and throughput, below 1 for
# the round trip. Needs root, /dev/kvm and qemu-system-x86 (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
. bench/lib.sh
need_qemu
cargo build -q --release -p hostd --bin hostd --example net_bench
out=$("$CARGO_TARGET_DIR/release/examples/net_bench" "$CARGO_TARGET_DIR/release/hostd" "$RUNS")
echo "$out"
field() { awk -v w="$1" -v k="$2" '$1=="RESULT" && $2==w { for (i = 3; i <= NF; i++) {
  split($i, kv, "="); if (kv[1] == k) { print kv[2]; exit } } }' <<<"$out"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
for who in hostd qemu; do
  for k in pps mb_s rtt_p50_us rtt_p99_us lost; do
    if [ -z "$(field $who $k)" ]; then echo "no $k figure for $who: the benchmark is incomplete" >&2; exit 1; fi
  done
done
echo "BENCH net_pps_vs_qemu $(ratio "$(field hostd pps)" "$(field qemu pps)") x"
echo "BENCH net_throughput_vs_qemu $(ratio "$(field hostd mb_s)" "$(field qemu mb_s)") x"
echo "BENCH net_rtt_p50_vs_qemu $(ratio "$(field hostd rtt_p50_us)" "$(field qemu rtt_p50_us)") x"
nopoll=$(awk '$1=="REFERENCE" && $2=="hostd-nopoll" { split($3, kv, "="); print kv[2] }' <<<"$out")
if [ -z "$nopoll" ]; then echo "no round trip for hostd-nopoll: the benchmark is incomplete" >&2; exit 1; fi
echo "BENCH net_rtt_p50_nopoll_vs_qemu $(ratio "$nopoll" "$(field qemu rtt_p50_us)") x"
lost=$(field hostd lost)
if [ "$lost" = none ]; then
  echo "hostd's migration was not measured (see the MIGRATION line): no net_migration_lost_packets" >&2
else
  echo "BENCH net_migration_lost_packets $lost packets"
fi
