#!/usr/bin/env bash
# bench/raft.sh: the pool coordinator next to etcd, both as 3 members on loopback with
# their data on the same disk, driven by the same client shape (poold-bench): N concurrent
# clients, each sending one small write and waiting for its acknowledgement, for
# BENCH_SECONDS; then the scheduler's placements per second (10,000 VMs, 1,000 hosts).
# The clients share one connection and one thread (poold-bench --client-threads 1), so the
# load generator takes as little as it can of the cores both systems run on.
# The two systems take turns, BENCH_ROUNDS times (default 3); each figure is the median of
# its rounds, and each ratio the median of the rounds' ratios (the machine is noisy).
#
# poold runs as it must, on mutual TLS: the script founds a CA for the pool (poolctl pki-init)
# and issues each member its TLS directory; poold-bench trusts that CA (--ca) and, for the
# members-only GetMemberStatus, presents member 1's certificate. etcd runs in clear, as
# before, unless ETCD_TLS=1 (bench/trust.sh, the TLS-to-TLS comparison): then etcd has its
# own CA made for the run (poolctl pki-init), each member a certificate from it for both
# its client and its peer listener, https URLs, and both --client-cert-auth and
# --peer-client-cert-auth; poold-bench and etcdctl present a client certificate.
#
# Needs etcd (Debian packages etcd-server and etcd-client, installed here when missing).
# The table also gives each system's server CPU per write (the three members' user + system
# time over the run, from /proc), which the machine's noise moves far less than throughput,
# and, for scale, each system's cheapest call on its leader with no Raft in it (poold's
# GetMemberStatus, etcd's serializable Range) at 64 clients: what a write costs beyond that
# is its consensus path.
# Ends with BENCH lines: raft_vs_etcd_throughput_c1, raft_vs_etcd_throughput_c64,
# raft_vs_etcd_p99_c64, raft_commit_p50_us_c1, scheduler_placements_per_s.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p poold -p poolctl --bins
BIN=$CARGO_TARGET_DIR/release

# etcdctl (etcd-client) is a separate package; the script uses it to find etcd's leader.
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "installing etcd-server and etcd-client (Debian) for the comparison" >&2
  apt-get install -y -qq etcd-server etcd-client >/dev/null
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
PKI=$WORK/pki
"$BIN/poolctl" pki-init "$PKI" --pool-id bench >/dev/null
for i in 1 2 3; do
  "$BIN/poolctl" pki-issue "$PKI" --pool-id bench --identity "member/$i" --name 127.0.0.1 \
    --out "$WORK/tls$i" >/dev/null
done
CA=$PKI/ca.pem
# The pool is founded with its first admin; the benchmark writes as it.
(umask 077 && echo "bench-admin-$RANDOM-$RANDOM-password" >"$WORK/admin-password")
POOLD_PIDS=()
for i in 1 2 3; do
  "$BIN/poold" --member-id "$i" --data-dir "$WORK/poold$i" --pool-id bench "${MEMBERS[@]}" \
    --tls-dir "$WORK/tls$i" --admin-password-file "$WORK/admin-password" --log warn \
    2>"$WORK/poold$i.log" &
  PIDS+=($!); POOLD_PIDS+=($!)
done
POOL_ADDRS="${PA[1]},${PA[2]},${PA[3]}"

# --- etcd: 3 members --------------------------------------------------------------------
declare -a EC EP
ETCD_PIDS=()
CLUSTER=""
SCHEME=http ETCD_NAME=etcd-3.4
# ETCD_CLIENT: what etcdctl and poold-bench present to etcd (nothing in clear).
ETCD_CLIENT=() BENCH_ETCD_TLS=()
if [ "${ETCD_TLS:-0}" = 1 ]; then
  SCHEME=https ETCD_NAME=etcd-tls
  "$BIN/poolctl" pki-init "$WORK/etcd-pki" --pool-id etcd >/dev/null
  for i in 1 2 3; do
    "$BIN/poolctl" pki-issue "$WORK/etcd-pki" --pool-id etcd --identity "member/$i" \
      --name 127.0.0.1 --out "$WORK/etcd-tls$i" >/dev/null
  done
  "$BIN/poolctl" pki-issue "$WORK/etcd-pki" --pool-id etcd --identity client/bench \
    --name 127.0.0.1 --out "$WORK/etcd-client" >/dev/null
  C=$WORK/etcd-client
  ETCD_CLIENT=(--cacert "$C/ca.pem" --cert "$C/cert.pem" --key "$C/key.pem")
  BENCH_ETCD_TLS=(--etcd-ca "$C/ca.pem" --etcd-cert "$C/cert.pem" --etcd-key "$C/key.pem")
fi
for i in 1 2 3; do
  EC[$i]=127.0.0.1:$(free_port); EP[$i]=127.0.0.1:$(free_port)
  CLUSTER+="${CLUSTER:+,}e$i=$SCHEME://${EP[$i]}"
done
for i in 1 2 3; do
  tls=()
  if [ "$SCHEME" = https ]; then
    d=$WORK/etcd-tls$i
    tls=(--cert-file "$d/cert.pem" --key-file "$d/key.pem" --trusted-ca-file "$d/ca.pem"
      --client-cert-auth --peer-cert-file "$d/cert.pem" --peer-key-file "$d/key.pem"
      --peer-trusted-ca-file "$d/ca.pem" --peer-client-cert-auth)
  fi
  etcd --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "$SCHEME://${EC[$i]}" --advertise-client-urls "$SCHEME://${EC[$i]}" \
    --listen-peer-urls "$SCHEME://${EP[$i]}" --initial-advertise-peer-urls "$SCHEME://${EP[$i]}" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token bench \
    "${tls[@]}" --log-level error >"$WORK/etcd$i.log" 2>&1 &
  PIDS+=($!); ETCD_PIDS+=($!)
done
etcdctl3() { ETCDCTL_API=3 etcdctl "${ETCD_CLIENT[@]}" "$@"; }

# Wait for both groups to elect a leader.
for _ in $(seq 1 100); do
  if etcdctl3 --endpoints "$SCHEME://${EC[1]}" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.2
done
ETCD_LEADER=""
for i in 1 2 3; do
  if etcdctl3 --endpoints "$SCHEME://${EC[$i]}" endpoint status -w simple 2>/dev/null \
      | awk -F', ' '{print $5}' | grep -q true; then ETCD_LEADER=${EC[$i]}; fi
done
[ -n "$ETCD_LEADER" ] || { echo "etcd elected no leader ($WORK/etcd1.log: $(tail -3 "$WORK/etcd1.log"))" >&2; exit 1; }
sleep 1

run() { "$BIN/poold-bench" "$@" | grep '^RESULT'; }
# CPU time (user + system, clock ticks) the given processes have used so far.
ticks() { local t=0 f; for p in "$@"; do read -ra f <"/proc/$p/stat"; t=$((t + f[13] + f[14])); done; echo "$t"; }
HZ=$(getconf CLK_TCK)
# `run` with the servers' CPU per write appended: cpu_us=<microseconds of the three members' CPU per write>.
run_cpu() {
  local -n pids=$1; shift
  local t0 r t1 ops
  t0=$(ticks "${pids[@]}")
  r=$(run "$@")
  t1=$(ticks "${pids[@]}")
  ops=$(sed -n 's/.* ops=\([0-9]*\) .*/\1/p' <<<"$r")
  echo "$r cpu_us=$(python3 -c "print(f'{($t1-$t0)*1e6/$HZ/max($ops,1):.0f}')")"
}
field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$2"; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END{print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
ratio() { python3 -c "a,b=float('$1'),float('$2'); print(f'{a/b:.3f}' if b else 'nan')"; }

# M[system clients field] holds each round's figure; Q[clients field] each round's ratio.
declare -A M Q
for round in $(seq 1 "$ROUNDS"); do
  for c in 1 64; do
    p=$(run_cpu POOLD_PIDS pool --members "$POOL_ADDRS" --ca "$CA" --password-file "$WORK/admin-password" \
      --clients "$c" --seconds "$SECONDS_EACH")
    e=$(run_cpu ETCD_PIDS etcd --endpoint "$ETCD_LEADER" "${BENCH_ETCD_TLS[@]}" --clients "$c" \
      --seconds "$SECONDS_EACH")
    echo "round $round, $c clients: poold $(field ops_per_s "$p") writes/s p50 $(field p50_us "$p") p99 $(field p99_us "$p") us cpu $(field cpu_us "$p") us/write; $ETCD_NAME $(field ops_per_s "$e") writes/s p50 $(field p50_us "$e") p99 $(field p99_us "$e") us cpu $(field cpu_us "$e") us/write"
    for f in ops_per_s p50_us p99_us cpu_us; do
      M[pool $c $f]+=" $(field "$f" "$p")"
      M[etcd $c $f]+=" $(field "$f" "$e")"
      Q[$c $f]+=" $(ratio "$(field "$f" "$p")" "$(field "$f" "$e")")"
    done
  done
  # For scale: each system's cheapest call on its leader, with no Raft in it.
  p=$(run_cpu POOLD_PIDS pool-status --members "$POOL_ADDRS" --ca "$CA" --tls-dir "$WORK/tls1" \
    --password-file "$WORK/admin-password" --clients 64 --seconds "$SECONDS_EACH")
  e=$(run_cpu ETCD_PIDS etcd-range --endpoint "$ETCD_LEADER" "${BENCH_ETCD_TLS[@]}" --clients 64 \
    --seconds "$SECONDS_EACH")
  echo "round $round, 64 clients, local read (no Raft): poold $(field ops_per_s "$p") calls/s cpu $(field cpu_us "$p") us/call; $ETCD_NAME $(field ops_per_s "$e") calls/s cpu $(field cpu_us "$e") us/call"
  for f in ops_per_s p50_us p99_us cpu_us; do
    M[pool read $f]+=" $(field "$f" "$p")"
    M[etcd read $f]+=" $(field "$f" "$e")"
  done
done
SCHED=$(run scheduler --hosts 1000 --vms 10000)

printf '\n%-10s %8s %12s %10s %10s %14s   (medians of %s rounds)\n' system clients ops/s p50_us p99_us cpu_us/write "$ROUNDS"
for c in 1 64; do
  for s in pool etcd; do
    printf '%-10s %8s %12s %10s %10s %14s\n' "$([ $s = pool ] && echo poold || echo "$ETCD_NAME")" "$c" \
      "$(median <<<"${M[$s $c ops_per_s]}")" "$(median <<<"${M[$s $c p50_us]}")" "$(median <<<"${M[$s $c p99_us]}")" \
      "$(median <<<"${M[$s $c cpu_us]}")"
  done
done
for s in pool etcd; do
  printf '%-10s %8s %12s %10s %10s %14s\n' "$([ $s = pool ] && echo poold || echo "$ETCD_NAME")" "64 read" \
    "$(median <<<"${M[$s read ops_per_s]}")" "$(median <<<"${M[$s read p50_us]}")" "$(median <<<"${M[$s read p99_us]}")" \
    "$(median <<<"${M[$s read cpu_us]}")"
done
echo "cpu_us/write: CPU time of the three members (user + system) per acknowledged write; the"
echo "load generator runs on the same cores. \"64 read\": a call answered by the leader alone"
echo "(poold GetMemberStatus, etcd serializable Range), the gRPC path with no Raft in it."
for s in pool etcd; do
  w=$(median <<<"${M[$s 64 cpu_us]}"); r=$(median <<<"${M[$s read cpu_us]}")
  echo "$([ $s = pool ] && echo poold || echo "$ETCD_NAME"): a write at 64 clients costs the members $w us of CPU, $r us of it the gRPC call itself, $(python3 -c "print(f'{$w-$r:.0f}')") us the consensus path"
done
echo "scheduler: $(field placements_per_s "$SCHED") placements/s (10,000 VMs on 1,000 hosts, $(field placed "$SCHED") placed)"
echo

echo "BENCH raft_vs_etcd_throughput_c1 $(median <<<"${Q[1 ops_per_s]}") ratio"
echo "BENCH raft_vs_etcd_throughput_c64 $(median <<<"${Q[64 ops_per_s]}") ratio"
echo "BENCH raft_vs_etcd_p99_c64 $(median <<<"${Q[64 p99_us]}") ratio"
echo "BENCH raft_commit_p50_us_c1 $(median <<<"${M[pool 1 p50_us]}") us"
echo "BENCH scheduler_placements_per_s $(field placements_per_s "$SCHED") placements/s"
