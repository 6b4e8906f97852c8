#!/usr/bin/env bash
# bench/target.sh: our iSCSI target against tgt on loopback, same client, same kind of
# backing file (a page-cached file of the same size), in one run.
#
#   reads:  iscsi-perf (libiscsi; it issues READ16 only)
#   writes: our fixed-load client, iscsi-target/examples/loadgen.rs, for both targets
#   raw:    the same client's --local mode on the backing file itself
#
# Rows: 4 KiB random read/write at QD1 and QD32, 1 MiB sequential read/write at QD8.
# Each cell is the best of BENCH_ROUNDS runs of BENCH_SECONDS (ours and tgt alternate,
# so background load on a shared machine hits both alike).
# Ends with BENCH lines: target_vs_tgt_<row> (ours / tgt) and target_seqread_vs_raw.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
if ! command -v iscsi-perf >/dev/null || ! command -v tgtd >/dev/null; then
  echo "installing libiscsi-bin and tgt" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libiscsi-bin tgt >/dev/null
fi

seconds=${BENCH_SECONDS:-4}
rounds=${BENCH_ROUNDS:-3}
size_mb=${BENCH_LUN_MB:-1024}
ours_port=${BENCH_OURS_PORT:-13271}
tgt_port=${BENCH_TGT_PORT:-13272}
ours_iqn=iqn.2024-01.org.pool.bench:ours
tgt_iqn=iqn.2024-01.org.pool.bench:tgt
export RUST_BACKTRACE=0

work=$(mktemp -d /tmp/iscsi-bench.XXXXXX)
ours_pid=""
tgt_pid=""
export TGT_IPC_SOCKET=$work/tgtd.sock
cleanup() {
  if [ -n "$ours_pid" ]; then kill "$ours_pid" 2>/dev/null || true; wait "$ours_pid" 2>/dev/null || true; fi
  if [ -n "$tgt_pid" ]; then
    tgtadm --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    tgtadm --op delete --mode system >/dev/null 2>&1 || true
    for _ in $(seq 50); do kill -0 "$tgt_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$tgt_pid" 2>/dev/null || true
    wait "$tgt_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

echo "building" >&2
cargo build -q -p iscsi-target --release --example serve --example loadgen
bin=${CARGO_TARGET_DIR:-$root/target}/release/examples
loadgen=$bin/loadgen

# Same size, same content, both in the page cache.
echo "preparing two ${size_mb} MiB backing files" >&2
head -c "$((size_mb << 20))" /dev/urandom >"$work/ours.img"
cp "$work/ours.img" "$work/tgt.img"
cat "$work/ours.img" "$work/tgt.img" >/dev/null

"$bin/serve" --file "$work/ours.img" --listen "127.0.0.1:$ours_port" --iqn "$ours_iqn" \
  >"$work/ours.log" 2>&1 &
ours_pid=$!
tgtd -f --iscsi "portal=127.0.0.1:$tgt_port" >"$work/tgt.log" 2>&1 &
tgt_pid=$!
wait_port "$ours_port"
wait_port "$tgt_port"
tgtadm --lld iscsi --op new --mode target --tid 1 -T "$tgt_iqn"
tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
ours_url="iscsi://127.0.0.1:$ours_port/$ours_iqn/0"
tgt_url="iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1"

# iscsi-perf prints "iops average N (M MB/s)"; reports IOPS.
perf_iops() {
  local url=$1 qd=$2 blocks=$3 random=$4 out
  out=$(timeout $((seconds + 20)) iscsi-perf -m "$qd" -b "$blocks" $random -t "$seconds" "$url" 2>&1 || true)
  grep -o 'iops average [0-9]*' <<<"$out" | tail -1 | awk '{print $3}'
}
# loadgen prints "iops=N mib_s=N lat_us=N"; reports IOPS.
gen_iops() {
  local out
  out=$(timeout $((seconds + 30)) "$loadgen" "$@" --seconds "$seconds" 2>&1 || true)
  sed -n 's/^iops=\([0-9]*\) .*/\1/p' <<<"$out" | tail -1
}
best() { printf '%s\n' "$@" | grep -E '^[0-9]+$' | sort -n | tail -1; }

declare -A ours tgt raw
rows="randread4k_qd1 randread4k_qd32 randwrite4k_qd1 randwrite4k_qd32 seqread1m seqwrite1m"
run_row() {
  local row=$1 o=() g=() r=() i
  for ((i = 0; i < rounds; i++)); do
    case $row in
      randread4k_qd1)
        o+=("$(perf_iops "$ours_url" 1 8 -r)"); g+=("$(perf_iops "$tgt_url" 1 8 -r)")
        r+=("$(gen_iops --local "$work/ours.img" --op read --bs 4096 --qd 1 --random)") ;;
      randread4k_qd32)
        o+=("$(perf_iops "$ours_url" 32 8 -r)"); g+=("$(perf_iops "$tgt_url" 32 8 -r)")
        r+=("$(gen_iops --local "$work/ours.img" --op read --bs 4096 --qd 32 --random)") ;;
      randwrite4k_qd1)
        o+=("$(gen_iops --url "$ours_url" --op write --bs 4096 --qd 1 --random)")
        g+=("$(gen_iops --url "$tgt_url" --op write --bs 4096 --qd 1 --random)")
        r+=("$(gen_iops --local "$work/ours.img" --op write --bs 4096 --qd 1 --random)") ;;
      randwrite4k_qd32)
        o+=("$(gen_iops --url "$ours_url" --op write --bs 4096 --qd 32 --random)")
        g+=("$(gen_iops --url "$tgt_url" --op write --bs 4096 --qd 32 --random)")
        r+=("$(gen_iops --local "$work/ours.img" --op write --bs 4096 --qd 32 --random)") ;;
      seqread1m)
        o+=("$(perf_iops "$ours_url" 8 2048 "")"); g+=("$(perf_iops "$tgt_url" 8 2048 "")")
        r+=("$(gen_iops --local "$work/ours.img" --op read --bs 1048576 --qd 8)") ;;
      seqwrite1m)
        o+=("$(gen_iops --url "$ours_url" --op write --bs 1048576 --qd 8)")
        g+=("$(gen_iops --url "$tgt_url" --op write --bs 1048576 --qd 8)")
        r+=("$(gen_iops --local "$work/ours.img" --op write --bs 1048576 --qd 8)") ;;
    esac
  done
  ours[$row]=$(best "${o[@]}")
  tgt[$row]=$(best "${g[@]}")
  raw[$row]=$(best "${r[@]}")
}

for row in $rows; do
  echo "measuring $row" >&2
  run_row "$row"
done

ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "0" }'; }
unit() { case $1 in seq*) echo "MiB/s" ;; *) echo "IOPS" ;; esac; }

echo
printf '%-18s %12s %12s %12s %9s %9s\n' ROW OURS TGT RAW-FILE OURS/TGT OURS/RAW
for row in $rows; do
  printf '%-18s %12s %12s %12s %9s %9s   (%s, %s)\n' "$row" "${ours[$row]:-?}" "${tgt[$row]:-?}" \
    "${raw[$row]:-?}" "$(ratio "${ours[$row]}" "${tgt[$row]}")" "$(ratio "${ours[$row]}" "${raw[$row]}")" \
    "$(unit "$row")" "QD$(case $row in *qd1) echo 1 ;; *qd32) echo 32 ;; *) echo 8 ;; esac)"
done
echo
for row in $rows; do
  echo "BENCH target_vs_tgt_$row $(ratio "${ours[$row]}" "${tgt[$row]}") x"
done
for row in $rows; do
  echo "BENCH target_${row} ${ours[$row]:-0} $(unit "$row" | tr -d /)"
  echo "BENCH tgt_${row} ${tgt[$row]:-0} $(unit "$row" | tr -d /)"
done
echo "BENCH target_seqread_vs_raw $(ratio "${ours[seqread1m]}" "${raw[seqread1m]}") x"
