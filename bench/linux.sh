#!/usr/bin/env bash
# bench/linux.sh: stock Linux guests, hostd against QEMU `-M microvm -enable-kvm` with the
# same kernel (Debian's cloud kernel), busybox initramfs, command line, 256 MiB and 2 vCPUs,
# inside the emulated KVM host on a PVM machine (directly where KVM runs Linux itself):
#   - boot: process start to the init's first console line, median of RUNS (5), taking
#     turns (hostd/examples/linux_bench.rs); QEMU's microvm again with `rtc=on` beside it:
#     without an RTC (microvm's default) Linux waits ~4 s for the CMOS clock it probes;
#   - live-migration downtime of the running guest, median of HOPS (5) hops over loopback
#     TCP, each VMM's own figure (ours over TLS between two hosts' certificates, as in
#     production; QEMU in clear, and again over TLS with tls-creds-x509, both ends
#     verifying), the guest ticking every 0.1 s on and after every hop;
#   - the Linux scenarios of the issue that pass: the e2e tests tests/tests/linux.rs and
#     linux_pool.rs (1 entries and disks, 2 ext4 root on iSCSI with ACPI shutdown, 3 reboot,
#     power-off and --force, 4 five live hops, 5 the guest network with the pool's MAC
#     answering pings through live migrations).
# Absolute times under emulation mean little; the ratios (hostd / QEMU, below 1: hostd is
# faster) are the figures. Needs qemu-system-x86 (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
HOPS=${HOPS:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
. bench/lib.sh
need_qemu
cargo build -q --release -p hostd --bin hostd --bin hostd-vmm --example linux_bench
cargo build -q --release -p e2e-tests --example emuhost_linux_bench
out=$("$CARGO_TARGET_DIR/release/examples/emuhost_linux_bench" \
  "$CARGO_TARGET_DIR/release/examples/linux_bench" "$RUNS" "$HOPS")
echo "$out"
field() { awk -v w="$1" -v k="$2" '$1=="RESULT" && $2==w { for (i = 3; i <= NF; i++) {
  split($i, kv, "="); if (kv[1] == k) { print kv[2]; exit } } }' <<<"$out"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
for f in "hostd boot_ms" "qemu boot_ms" "qemu_rtc boot_ms" "hostd downtime_ms" "qemu downtime_ms" "qemu_tls downtime_ms"; do
  set -- $f
  if [ -z "$(field "$1" "$2")" ]; then echo "no $2 figure for $1: the benchmark is incomplete" >&2; exit 1; fi
done

# The scenarios: each is the e2e tests that assert it.
tests=$(cargo test -p e2e-tests --test linux --test linux_pool -- --test-threads 1 2>&1 || true)
grep -E '^test .* \.\.\. |^test result' <<<"$tests" || true
# A scenario that did not pass says why (its panic and the lines before it).
grep -B 25 -A 5 "panicked at" <<<"$tests" | tail -n 120 || true
passed() { grep -q "^test $1 \.\.\. ok" <<<"$tests"; }
scenarios=(
  "stock_kernels_boot_through_each_entry_and_find_their_disks"
  "linux_on_an_iscsi_root_shuts_down_by_acpi_and_keeps_its_files"
  "a_guest_reboots_every_way_powers_off_and_obeys_the_power_button linux_on_an_iscsi_root_shuts_down_by_acpi_and_keeps_its_files"
  "linux_migrates_live_five_hops_keeping_its_clock_and_data"
  "a_stock_kernel_finds_its_network_and_pings_both_ways linux_keeps_its_mac_and_answers_ping_through_live_migration"
)
n=0
for i in "${!scenarios[@]}"; do
  ok=${scenarios[$i]:+yes}
  for t in ${scenarios[$i]}; do passed "$t" || ok=""; done
  echo "scenario $((i + 1)): ${ok:-not passed}"
  [ -n "$ok" ] && n=$((n + 1))
done

echo "BENCH linux_boot_ms $(field hostd boot_ms) ms"
echo "BENCH linux_boot_qemu_ms $(field qemu boot_ms) ms"
echo "BENCH linux_boot_vs_qemu $(ratio "$(field hostd boot_ms)" "$(field qemu boot_ms)") ratio"
echo "BENCH linux_boot_qemu_rtc_ms $(field qemu_rtc boot_ms) ms"
echo "BENCH linux_boot_vs_qemu_rtc $(ratio "$(field hostd boot_ms)" "$(field qemu_rtc boot_ms)") ratio"
echo "BENCH linux_migration_downtime_ms $(field hostd downtime_ms) ms"
echo "BENCH linux_migration_downtime_qemu_ms $(field qemu downtime_ms) ms"
echo "BENCH linux_migration_downtime_vs_qemu $(ratio "$(field hostd downtime_ms)" "$(field qemu downtime_ms)") ratio"
echo "BENCH linux_migration_downtime_qemu_tls_ms $(field qemu_tls downtime_ms) ms"
echo "BENCH linux_migration_downtime_vs_qemu_tls $(ratio "$(field hostd downtime_ms)" "$(field qemu_tls downtime_ms)") ratio"
echo "BENCH linux_scenarios_passed $n count"
echo "BENCH linux_scenarios_total ${#scenarios[@]} count"
