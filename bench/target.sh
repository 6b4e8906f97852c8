#!/usr/bin/env bash
# bench/target.sh: our iSCSI target against tgt on loopback, same client, in one run:
#
#   ours  our target (iscsi-target's serve example) on a page-cached file
#   thin  our target inside storaged, serving a thin volume of a file-backed thin pool
#         (the product), filled with data first so reads touch mapped chunks
#   tgt   tgt on a page-cached file of the same size and content
#   raw   the backing file itself, read and written locally
#
#   reads:  iscsi-perf (libiscsi; it issues READ16 only)
#   writes: our fixed-load client, iscsi-target/examples/loadgen.rs, for every target
#   raw:    the same client's --local mode on the backing file itself
#
# Rows: 4 KiB random read/write at QD1 and QD32, 1 MiB sequential read/write at QD8.
# Each cell is the median of BENCH_ROUNDS runs of BENCH_SECONDS; the columns alternate
# within each round, so background load on a shared machine hits them alike.
#
# Also measured: the loopback TCP ceiling, one thread writing a cached 1 MiB buffer to
# another over loopback TCP (no storage, no iSCSI): no target can read faster than this,
# so `tcp_ceiling_vs_raw` bounds `target_seqread_vs_raw` on this machine.
#
# Ends with BENCH lines: target_vs_tgt_<row> and target_thin_vs_tgt_<row> (ours / tgt),
# target_seqread_vs_raw and target_thin_seqread_vs_raw, tcp_ceiling_vs_raw, and the
# absolute figures.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

. bench/lib.sh
need_iscsi_tools

seconds=${BENCH_SECONDS:-4}
rounds=${BENCH_ROUNDS:-3}
size_mb=${BENCH_LUN_MB:-1024}
ours_port=${BENCH_OURS_PORT:-13271}
tgt_port=${BENCH_TGT_PORT:-13272}
thin_port=${BENCH_THIN_PORT:-13273}
ours_iqn=iqn.2024-01.org.pool.bench:ours
tgt_iqn=iqn.2024-01.org.pool.bench:tgt
thin_iqn=iqn.2024-01.org.pool.bench:thin
# One initiator name for every client, so storaged's ACL can name it.
init=iqn.2024-01.org.pool.bench:client
export RUST_BACKTRACE=0

work=$(mktemp -d /tmp/iscsi-bench.XXXXXX)
ours_pid=""
thin_pid=""
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$ours_pid"
  stop_pid "$thin_pid"
  tgt_stop
  rm -rf "$work"
}
trap cleanup EXIT

echo "building" >&2
cargo build -q --release -p iscsi-target --example serve --example loadgen -p storaged --bin storaged \
  -p poolctl --bin poolctl
out=${CARGO_TARGET_DIR:-$root/target}/release
bin=$out/examples
loadgen=$bin/loadgen
storaged=$out/storaged

# Same size, same content, all in the page cache, and all written the same way: 1 MiB
# writes, as the thin volume is filled below. (It matters: on Linux 6.18's ext4, page cache
# filled by large writes sits in large folios, and a 4 KiB write into a large folio costs
# several times one into a small one. A file written by `head` (small writes) next to one
# written by `cp` (large writes) would hand the first target a 2x edge in random writes.)
echo "preparing two ${size_mb} MiB backing files and a thin pool" >&2
dd if=/dev/urandom of="$work/ours.img" bs=1M count="$size_mb" status=none
dd if="$work/ours.img" of="$work/tgt.img" bs=1M status=none

"$bin/serve" --file "$work/ours.img" --listen "127.0.0.1:$ours_port" --iqn "$ours_iqn" \
  >"$work/ours.log" 2>&1 &
ours_pid=$!
tgt_start "$work" "$tgt_port" "$tgt_iqn" "$work/tgt.img"

# The pool has room for the whole volume and then some; the volume is as big as the files.
"$storaged" pool create --file "$work/pool.img" --size "$((size_mb + 256))M" >/dev/null
"$storaged" volume create --file "$work/pool.img" --name lun0 --size "${size_mb}M" >/dev/null
"$storaged" export create --file "$work/pool.img" lun0 --target-iqn "$thin_iqn" \
  --allow "$init" >/dev/null
# storaged serves StorageService on mutual TLS only: a CA and a storage certificate.
"$out/poolctl" pki-init "$work/pki" --pool-id bench >/dev/null
"$out/poolctl" pki-issue "$work/pki" --pool-id bench --identity storage/thin --name 127.0.0.1 \
  --out "$work/pki/storaged" >/dev/null
cat >"$work/storaged.toml" <<EOF
listen = "127.0.0.1:0"
iscsi_listen = "127.0.0.1:$thin_port"
state_dir = "$work/storaged-state"
tls_dir = "$work/pki/storaged"
[[pools]]
file = "$work/pool.img"
EOF
"$storaged" serve --config "$work/storaged.toml" >"$work/thin.log" 2>&1 &
thin_pid=$!

wait_port "$ours_port"
wait_port "$thin_port"
ours_url="iscsi://127.0.0.1:$ours_port/$ours_iqn/0"
tgt_url="iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1"
thin_url="iscsi://127.0.0.1:$thin_port/$thin_iqn/0"

# Every chunk of the thin volume mapped (an unmapped chunk reads as zeros without
# touching the disk, which would flatter the thin column).
echo "filling the thin volume" >&2
"$loadgen" --url "$thin_url" --initiator "$init" --op write --bs 1048576 --qd 8 --once >/dev/null

# iscsi-perf prints "iops average N (M MB/s)"; reports IOPS.
perf_iops() {
  local url=$1 qd=$2 blocks=$3 random=$4 out
  out=$(timeout $((seconds + 20)) iscsi-perf -i "$init" -m "$qd" -b "$blocks" $random -t "$seconds" "$url" 2>&1 || true)
  grep -o 'iops average [0-9]*' <<<"$out" | tail -1 | awk '{print $3}'
}
# loadgen prints "iops=N mib_s=N lat_us=N"; reports IOPS.
gen_iops() {
  local out
  out=$(timeout $((seconds + 30)) "$loadgen" "$@" --seconds "$seconds" 2>&1 || true)
  sed -n 's/^iops=\([0-9]*\) .*/\1/p' <<<"$out" | tail -1
}
median() {
  printf '%s\n' "$@" | grep -E '^[0-9]+$' | sort -n | awk '{a[NR] = $1} END { if (NR) print a[int((NR + 1) / 2)] }'
}

declare -A ours thin tgt raw
rows="randread4k_qd1 randread4k_qd32 randwrite4k_qd1 randwrite4k_qd32 seqread1m seqwrite1m"
# One measurement of one row on one target: "ours", "thin", "tgt" or "raw".
measure() {
  local row=$1 who=$2 url
  case $who in ours) url=$ours_url ;; thin) url=$thin_url ;; tgt) url=$tgt_url ;; esac
  local local_args=(--local "$work/ours.img")
  case $row in
    randread4k_qd1 | randread4k_qd32 | seqread1m)
      local qd blocks random=""
      case $row in
        randread4k_qd1) qd=1 blocks=8 random=-r ;;
        randread4k_qd32) qd=32 blocks=8 random=-r ;;
        seqread1m) qd=8 blocks=2048 ;;
      esac
      if [ "$who" = raw ]; then
        gen_iops "${local_args[@]}" --op read --bs $((blocks * 512)) --qd "$qd" ${random:+--random}
      else
        perf_iops "$url" "$qd" "$blocks" "$random"
      fi
      ;;
    *)
      local qd bs random=""
      case $row in
        randwrite4k_qd1) qd=1 bs=4096 random=--random ;;
        randwrite4k_qd32) qd=32 bs=4096 random=--random ;;
        seqwrite1m) qd=8 bs=1048576 ;;
      esac
      if [ "$who" = raw ]; then
        gen_iops "${local_args[@]}" --op write --bs "$bs" --qd "$qd" $random
      else
        gen_iops --url "$url" --initiator "$init" --op write --bs "$bs" --qd "$qd" $random
      fi
      ;;
  esac
}
ceiling=""
run_row() {
  local row=$1 o=() n=() g=() r=() c=() i
  for ((i = 0; i < rounds; i++)); do
    o+=("$(measure "$row" ours)")
    n+=("$(measure "$row" thin)")
    g+=("$(measure "$row" tgt)")
    r+=("$(measure "$row" raw)")
    # The ceiling in the same rounds as the sequential reads it bounds.
    if [ "$row" = seqread1m ]; then c+=("$(gen_iops --tcp-ceiling --bs 1048576)"); fi
  done
  ours[$row]=$(median "${o[@]}")
  thin[$row]=$(median "${n[@]}")
  tgt[$row]=$(median "${g[@]}")
  raw[$row]=$(median "${r[@]}")
  if [ "$row" = seqread1m ]; then ceiling=$(median "${c[@]}"); fi
}

for row in $rows; do
  echo "measuring $row" >&2
  run_row "$row"
done

ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "0" }'; }
unit() { case $1 in seq*) echo "MiB/s" ;; *) echo "IOPS" ;; esac; }

echo
printf '%-18s %9s %9s %9s %9s %9s %9s %9s\n' ROW OURS THIN TGT RAW-FILE OURS/TGT THIN/TGT OURS/RAW
for row in $rows; do
  printf '%-18s %9s %9s %9s %9s %9s %9s %9s   (%s, %s)\n' "$row" "${ours[$row]:-?}" \
    "${thin[$row]:-?}" "${tgt[$row]:-?}" "${raw[$row]:-?}" \
    "$(ratio "${ours[$row]}" "${tgt[$row]}")" "$(ratio "${thin[$row]}" "${tgt[$row]}")" \
    "$(ratio "${ours[$row]}" "${raw[$row]}")" \
    "$(unit "$row")" "QD$(case $row in *qd1) echo 1 ;; *qd32) echo 32 ;; *) echo 8 ;; esac)"
done
printf '%-18s %9s   (MiB/s: one thread writing a cached buffer to another over loopback TCP)\n' \
  tcp_ceiling "${ceiling:-?}"
echo
for row in $rows; do
  echo "BENCH target_vs_tgt_$row $(ratio "${ours[$row]}" "${tgt[$row]}") x"
done
for row in $rows; do
  echo "BENCH target_thin_vs_tgt_$row $(ratio "${thin[$row]}" "${tgt[$row]}") x"
done
for row in $rows; do
  echo "BENCH target_${row} ${ours[$row]:-0} $(unit "$row" | tr -d /)"
  echo "BENCH target_thin_${row} ${thin[$row]:-0} $(unit "$row" | tr -d /)"
  echo "BENCH tgt_${row} ${tgt[$row]:-0} $(unit "$row" | tr -d /)"
  echo "BENCH raw_${row} ${raw[$row]:-0} $(unit "$row" | tr -d /)"
done
echo "BENCH tcp_ceiling_seq1m ${ceiling:-0} MiBs"
echo "BENCH target_seqread_vs_raw $(ratio "${ours[seqread1m]}" "${raw[seqread1m]}") x"
echo "BENCH target_thin_seqread_vs_raw $(ratio "${thin[seqread1m]}" "${raw[seqread1m]}") x"
echo "BENCH tcp_ceiling_vs_raw $(ratio "$ceiling" "${raw[seqread1m]}") x"
