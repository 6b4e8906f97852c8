#!/usr/bin/env bash
# bench/initiator.sh: our initiator (`iscsi bench`) against libiscsi's iscsi-perf, both
# reading the same tgt LUN on loopback in one run.
#
# Rows: 4 KiB random read at QD32, 1 MiB sequential read at QD8. Both clients run the
# same fixed load for BENCH_SECONDS; the runs alternate (ours, libiscsi, libiscsi, ours,
# ...) for BENCH_ROUNDS rounds so that background load on a shared machine hits both
# alike, and each cell is the median of its rounds.
#
# Each client's CPU time per I/O (user + system, from the shell's `time`) is reported
# too: it shows which client leaves more of the machine to the target, and it moves far
# less with background load than the rates do.
#
# Ends with BENCH lines: initiator_vs_libiscsi_randread4k_qd32 and
# initiator_vs_libiscsi_seqread1m (ours / libiscsi: the median over rounds of the ratio
# of the two back-to-back runs of a round), then the absolute figures (medians).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

. bench/lib.sh
need_iscsi_tools

seconds=${BENCH_SECONDS:-5}
rounds=${BENCH_ROUNDS:-5}
size_mb=${BENCH_LUN_MB:-1024}
port=${BENCH_INITIATOR_PORT:-13281}
seq_qd=${BENCH_SEQ_QD:-8}
iqn=iqn.2024-01.org.pool.bench:initiator
initiator=iqn.2024-01.org.pool.bench:client

work=$(mktemp -d /tmp/iscsi-initiator-bench.XXXXXX)
cleanup() {
  tgt_stop
  rm -rf "$work"
}
trap cleanup EXIT

echo "building" >&2
cargo build -q -p iscsi-initiator --features cli --release --bin iscsi
ours_bin=${CARGO_TARGET_DIR:-$root/target}/release/iscsi

echo "preparing a ${size_mb} MiB LUN in the page cache" >&2
head -c "$((size_mb << 20))" /dev/urandom >"$work/lun.img"
cat "$work/lun.img" >/dev/null

tgt_start "$work" "$port" "$iqn" "$work/lun.img"
url="iscsi://127.0.0.1:$port/$iqn/1"

# Each prints "IOPS CPU_US_PER_IO": the rate, and the client's own CPU time (user + system)
# per I/O, which background load on a shared machine hardly changes.
# iscsi-perf ends with "iops average N (M MB/s)", ours with "iops=N ...".
TIMEFORMAT='%U %S'
cpu_per_io() { awk -v t="$1" -v n="$2" -v s="$seconds" 'BEGIN { split(t, a, " "); if (n > 0) printf "%.1f", (a[1] + a[2]) * 1e6 / (n * s); else print 0 }'; }
perf_iops() {
  local qd=$1 blocks=$2 random=$3 out t iops
  { time timeout $((seconds + 20)) iscsi-perf -i "$initiator" -m "$qd" -b "$blocks" $random \
    -t "$seconds" "$url" >"$work/out" 2>&1 ; } 2>"$work/time" || true
  out=$(tr '\r' '\n' <"$work/out")
  iops=$(grep -oE '^ *iops average [0-9]+' <<<"$out" | tail -1 | awk '{print $3}')
  echo "${iops:-0} $(cpu_per_io "$(tail -1 "$work/time")" "${iops:-0}")"
}
ours_iops() {
  local qd=$1 bs=$2 random=$3 t iops
  { time timeout $((seconds + 20)) "$ours_bin" --initiator "$initiator" bench "$url" --op read \
    --bs "$bs" --qd "$qd" $random --seconds "$seconds" >"$work/out" 2>&1 ; } 2>"$work/time" || true
  iops=$(sed -n 's/^iops=\([0-9]*\) .*/\1/p' "$work/out" | tail -1)
  echo "${iops:-0} $(cpu_per_io "$(tail -1 "$work/time")" "${iops:-0}")"
}
median() { printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | awk '{v[NR]=$1} END { if (NR) print v[int((NR+1)/2)]; else print 0 }'; }
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "0" }'; }

declare -A ours theirs runs_o runs_t cpu_o cpu_t paired
rows="randread4k_qd32 seqread1m"
for row in $rows; do
  echo "measuring $row ($rounds rounds of ${seconds}s each, alternating)" >&2
  o=() t=() co=() ct=()
  for ((i = 0; i < rounds; i++)); do
    case $row in
      randread4k_qd32) oa=(32 4096 --random) ta=(32 8 -r) ;;
      seqread1m) oa=("$seq_qd" 1048576 "") ta=("$seq_qd" 2048 "") ;;
    esac
    if ((i % 2 == 0)); then
      read -r a b <<<"$(ours_iops "${oa[@]}")"; o+=("$a"); co+=("$b")
      read -r a b <<<"$(perf_iops "${ta[@]}")"; t+=("$a"); ct+=("$b")
    else
      read -r a b <<<"$(perf_iops "${ta[@]}")"; t+=("$a"); ct+=("$b")
      read -r a b <<<"$(ours_iops "${oa[@]}")"; o+=("$a"); co+=("$b")
    fi
  done
  # Each round's two runs ran back to back, under much the same background load: the
  # median of the per-round ratios cancels most of the drift between rounds.
  r=()
  for ((i = 0; i < rounds; i++)); do r+=("$(ratio "${o[$i]}" "${t[$i]}")"); done
  paired[$row]=$(median "${r[@]}")
  ours[$row]=$(median "${o[@]}")
  theirs[$row]=$(median "${t[@]}")
  cpu_o[$row]=$(median "${co[@]}")
  cpu_t[$row]=$(median "${ct[@]}")
  runs_o[$row]="${o[*]}"
  runs_t[$row]="${t[*]}"
done

echo
printf '%-18s %10s %10s %8s %8s %14s %16s\n' ROW OURS LIBISCSI RATIO PAIRED "OURS CPU/IO" "LIBISCSI CPU/IO"
for row in $rows; do
  unit=IOPS
  [ "$row" = seqread1m ] && unit="MiB/s"
  printf '%-18s %10s %10s %8s %8s %11s us %13s us   (%s, medians of %s rounds)\n' "$row" \
    "${ours[$row]}" "${theirs[$row]}" "$(ratio "${ours[$row]}" "${theirs[$row]}")" "${paired[$row]}" \
    "${cpu_o[$row]}" "${cpu_t[$row]}" "$unit" "$rounds"
done
echo "RATIO: median ours / median libiscsi; PAIRED: median of each round's ours / libiscsi"
echo "(the BENCH ratios below are the PAIRED ones)"
echo
for row in $rows; do
  echo "runs $row: ours ${runs_o[$row]} | libiscsi ${runs_t[$row]}"
done
echo
echo "BENCH initiator_vs_libiscsi_randread4k_qd32 ${paired[randread4k_qd32]} x"
echo "BENCH initiator_vs_libiscsi_seqread1m ${paired[seqread1m]} x"
echo "BENCH initiator_randread4k_qd32 ${ours[randread4k_qd32]} IOPS"
echo "BENCH libiscsi_randread4k_qd32 ${theirs[randread4k_qd32]} IOPS"
echo "BENCH initiator_seqread1m ${ours[seqread1m]} MiBs"
echo "BENCH libiscsi_seqread1m ${theirs[seqread1m]} MiBs"
echo "BENCH initiator_cpu_per_io_randread4k_qd32 ${cpu_o[randread4k_qd32]} us"
echo "BENCH libiscsi_cpu_per_io_randread4k_qd32 ${cpu_t[randread4k_qd32]} us"
echo "BENCH initiator_cpu_per_io_seqread1m ${cpu_o[seqread1m]} us"
echo "BENCH libiscsi_cpu_per_io_seqread1m ${cpu_t[seqread1m]} us"
