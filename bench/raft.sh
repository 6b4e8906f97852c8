#!/usr/bin/env bash
# bench/raft.sh: the pool coordinator next to etcd, both as 3 members on loopback with
# their data on the same disk, driven by the same client shape (poold-bench): N concurrent
# clients, each sending one small write and waiting for its acknowledgement, for
# BENCH_SECONDS; then the scheduler's placements per second (10,000 VMs, 1,000 hosts).
#
# Needs etcd (Debian package etcd-server, installed here when missing).
# Ends with BENCH lines: raft_vs_etcd_throughput_c1, raft_vs_etcd_throughput_c64,
# raft_vs_etcd_p99_c64, raft_commit_p50_us_c1, scheduler_placements_per_s.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${BENCH_SECONDS:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p poold --bins
BIN=$CARGO_TARGET_DIR/release

if ! command -v etcd >/dev/null; then
  echo "installing etcd-server (Debian) for the comparison" >&2
  apt-get install -y -qq etcd-server >/dev/null
fi

WORK=$(mktemp -d /var/tmp/raft-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- poold: 3 members -------------------------------------------------------------------
declare -a PA
MEMBERS=()
for i in 1 2 3; do PA[$i]=127.0.0.1:$(free_port); MEMBERS+=(--member "$i=${PA[$i]}"); done
for i in 1 2 3; do
  "$BIN/poold" --member-id "$i" --data-dir "$WORK/poold$i" --pool-id bench "${MEMBERS[@]}" \
    --log warn 2>"$WORK/poold$i.log" &
  PIDS+=($!)
done
POOL_ADDRS="${PA[1]},${PA[2]},${PA[3]}"

# --- etcd: 3 members --------------------------------------------------------------------
declare -a EC EP
CLUSTER=""
for i in 1 2 3; do
  EC[$i]=127.0.0.1:$(free_port); EP[$i]=127.0.0.1:$(free_port)
  CLUSTER+="${CLUSTER:+,}e$i=http://${EP[$i]}"
done
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "http://${EC[$i]}" --advertise-client-urls "http://${EC[$i]}" \
    --listen-peer-urls "http://${EP[$i]}" --initial-advertise-peer-urls "http://${EP[$i]}" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token bench \
    --log-level error >"$WORK/etcd$i.log" 2>&1 &
  PIDS+=($!)
done

# Wait for both groups to elect a leader.
for _ in $(seq 1 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "http://${EC[1]}" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.2
done
ETCD_LEADER=""
for i in 1 2 3; do
  if ETCDCTL_API=3 etcdctl --endpoints "http://${EC[$i]}" endpoint status -w simple 2>/dev/null \
      | awk -F', ' '{print $5}' | grep -q true; then ETCD_LEADER=${EC[$i]}; fi
done
[ -n "$ETCD_LEADER" ] || { echo "etcd elected no leader" >&2; exit 1; }
sleep 1

run() { "$BIN/poold-bench" "$@" | grep '^RESULT'; }
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2"; }

declare -A R
for c in 1 64; do
  R[pool$c]=$(run pool --members "$POOL_ADDRS" --clients "$c" --seconds "$SECONDS_EACH")
  R[etcd$c]=$(run etcd --endpoint "$ETCD_LEADER" --clients "$c" --seconds "$SECONDS_EACH")
done
SCHED=$(run scheduler --hosts 1000 --vms 10000)

printf '\n%-10s %8s %12s %10s %10s\n' system clients ops/s p50_us p99_us
for c in 1 64; do
  for s in pool etcd; do
    r=${R[$s$c]}
    printf '%-10s %8s %12s %10s %10s\n' "$([ $s = pool ] && echo poold || echo etcd-3.4)" "$c" \
      "$(field ops_per_s "$r")" "$(field p50_us "$r")" "$(field p99_us "$r")"
  done
done
echo "scheduler: $(field placements_per_s "$SCHED") placements/s (10,000 VMs on 1,000 hosts, $(field placed "$SCHED") placed)"
echo

ratio() { python3 -c "a,b=float('$1'),float('$2'); print(f'{a/b:.2f}' if b else 'nan')"; }
echo "BENCH raft_vs_etcd_throughput_c1 $(ratio "$(field ops_per_s "${R[pool1]}")" "$(field ops_per_s "${R[etcd1]}")") ratio"
echo "BENCH raft_vs_etcd_throughput_c64 $(ratio "$(field ops_per_s "${R[pool64]}")" "$(field ops_per_s "${R[etcd64]}")") ratio"
echo "BENCH raft_vs_etcd_p99_c64 $(ratio "$(field p99_us "${R[pool64]}")" "$(field p99_us "${R[etcd64]}")") ratio"
echo "BENCH raft_commit_p50_us_c1 $(field p50_us "${R[pool1]}") us"
echo "BENCH scheduler_placements_per_s $(field placements_per_s "$SCHED") placements/s"
