#!/usr/bin/env bash
# bench/trust.sh: what the pool's security costs it, next to its peers with theirs on.
#   1. Coordinator writes, 3 members on loopback, TLS on both sides: bench/raft.sh with
#      ETCD_TLS=1, i.e. poold exactly as raft.sh runs it (mutual TLS between members, TLS
#      and a token to clients) against etcd 3.4 with peer and client TLS and both
#      --peer-client-cert-auth and --client-cert-auth (its certificates made for the run),
#      1 and 64 clients, BENCH_SECONDS (10) each, BENCH_ROUNDS (3) rounds.
#   2. Live migration downtime, TLS on both sides: hostd's stream (TLS 1.3 between two
#      hosts' pool certificates) against QEMU's TLS migration (tls-creds-x509, both ends
#      verifying the peer, certificates made for the run), the guest, 2 vCPUs, MIB (512)
#      MiB and HOPS (10) hops of bench/run.sh migration, idle and dirtying.
#   3. The intruder suite (tests/tests/trust.rs) against a running pool: how many attempts
#      it made and how many were refused.
# Ratios are poold / etcd-with-TLS and hostd / QEMU-with-TLS, medians as raft.sh and
# migration.sh compute them: throughput above 1 is poold faster; p99 (poold's p99 latency
# over etcd's at 64 clients) and downtime below 1 are ours better.
# Goals (printed next to the figures, not tuned away): throughput ≥ 1.5 at 64 clients, p99
# ≤ 1, migration downtime ≤ 0.5.
# Needs etcd (etcd-server, etcd-client) and QEMU (qemu-system-x86), installed when missing,
# and /dev/kvm. Fails rather than print a partial table.
# Ends with BENCH lines: trust_raft_vs_etcd_tls_throughput_c1,
# trust_raft_vs_etcd_tls_throughput_c64, trust_raft_vs_etcd_tls_p99_c64,
# trust_migration_downtime_vs_qemu_tls_idle, trust_migration_downtime_vs_qemu_tls_dirty,
# trust_intruder_attempts, trust_intruder_refused.
set -euo pipefail
cd "$(dirname "$0")/.."
HOPS=${HOPS:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$CARGO_TARGET_DIR/release
[ -e /dev/kvm ] || { echo "no /dev/kvm: the migration comparison cannot run" >&2; exit 1; }
. bench/lib.sh
need_qemu

WORK=$(mktemp -d /var/tmp/trust-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
# goal VALUE OP LIMIT: "met" or "missed" for VALUE OP LIMIT (OP: le or ge).
goal() { awk -v v="$1" -v o="$2" -v l="$3" 'BEGIN {
  ok = (o == "ge") ? v >= l : v <= l; print (v == v + 0 && ok) ? "met" : "MISSED" }'; }
RESULTS=()

# --- 1. coordinator writes: raft.sh with etcd on TLS --------------------------------------
echo "== coordinator writes: poold (mTLS) vs etcd (peer and client TLS)"
# raft.sh's own BENCH keys name the comparison in clear: kept for the renaming below only.
ETCD_TLS=1 bash bench/raft.sh | tee "$WORK/raft.out" | grep -v '^BENCH '
bench() { awk -v k="$1" '$1 == "BENCH" && $2 == k { print $3 }' "$WORK/raft.out"; }
for k in throughput_c1 throughput_c64 p99_c64; do
  v=$(bench "raft_vs_etcd_$k")
  [ -n "$v" ] || { echo "bench/raft.sh printed no raft_vs_etcd_$k" >&2; exit 1; }
  declare "R_$k=$v"
done
RESULTS+=("BENCH trust_raft_vs_etcd_tls_throughput_c1 $R_throughput_c1 ratio")
RESULTS+=("BENCH trust_raft_vs_etcd_tls_throughput_c64 $R_throughput_c64 ratio")
RESULTS+=("BENCH trust_raft_vs_etcd_tls_p99_c64 $R_p99_c64 ratio")

# --- 2. migration: hostd's TLS stream vs QEMU's TLS migration -----------------------------
echo "== live migration: hostd (TLS 1.3) vs QEMU (tls-creds-x509)"
cargo build --release -q -p poolctl --bins
cargo build --release -q -p hostd --example migration_bench
# QEMU's credentials, from a CA made for the run, in the names tls-creds-x509 reads; one
# directory holds both ends, since every VM is a destination and then a source.
"$BIN/poolctl" pki-init "$WORK/qemu-pki" --pool-id qemu >/dev/null
for end in server client; do
  "$BIN/poolctl" pki-issue "$WORK/qemu-pki" --pool-id qemu --identity "host/qemu-$end" \
    --name 127.0.0.1 --out "$WORK/qemu-$end" >/dev/null
done
Q=$WORK/qemu-x509
(umask 077 && mkdir "$Q")
cp "$WORK/qemu-server/ca.pem" "$Q/ca-cert.pem"
for end in server client; do
  cp "$WORK/qemu-$end/cert.pem" "$Q/$end-cert.pem"
  (umask 077 && cp "$WORK/qemu-$end/key.pem" "$Q/$end-key.pem")
done
QEMU_TLS_DIR=$Q "$BIN/examples/migration_bench" "$HOPS" 2 "${MIB:-512}" | tee "$WORK/migration.out"
mig() { # who scenario key
  awk -v w="$1" -v s="$2" -v k="$3" '$1 == "RESULT" && $2 == w && $3 == s {
    for (i = 4; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) { print kv[2]; exit } } }' \
    "$WORK/migration.out"
}
for s in idle dirty; do
  ours=$(mig hostd "$s" downtime_ms); theirs=$(mig qemu_tls "$s" downtime_ms)
  [ -n "$ours" ] && [ -n "$theirs" ] ||
    { echo "migration_bench gave no hostd or qemu_tls figure for $s" >&2; exit 1; }
  declare "M_$s=$(ratio "$ours" "$theirs")"
  echo "$s: hostd $ours ms, QEMU over TLS $theirs ms (median downtime)"
done
RESULTS+=("BENCH trust_migration_downtime_vs_qemu_tls_idle $M_idle ratio")
RESULTS+=("BENCH trust_migration_downtime_vs_qemu_tls_dirty $M_dirty ratio")

# --- 3. the intruder suite ----------------------------------------------------------------
echo "== intruder suite (tests/tests/trust.rs)"
# The tests start the debug binaries.
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}
cargo build -q -p poold -p hostd -p storaged -p poolctl -p iscsi-initiator \
  --features iscsi-initiator/cli --bins
suite=0
cargo test -q -p e2e-tests --test trust -- --nocapture >"$WORK/intruder.out" 2>&1 || suite=$?
line=$(grep -o 'INTRUDER attempts=[0-9]* refused=[0-9]*' "$WORK/intruder.out" | tail -1 || true)
if [ -z "$line" ]; then
  tail -40 "$WORK/intruder.out" >&2
  echo "the intruder suite printed no INTRUDER line (exit $suite)" >&2
  exit 1
fi
grep -v '^INTRUDER' "$WORK/intruder.out" | grep . || true
attempts=$(sed 's/.*attempts=\([0-9]*\).*/\1/' <<<"$line")
refused=$(sed 's/.*refused=\([0-9]*\).*/\1/' <<<"$line")
echo "$line (suite exit $suite)"
RESULTS+=("BENCH trust_intruder_attempts $attempts attempts")
RESULTS+=("BENCH trust_intruder_refused $refused attempts")

echo
echo "goals: throughput at 64 clients $R_throughput_c64 vs >= 1.5: $(goal "$R_throughput_c64" ge 1.5);" \
  "p99 at 64 clients $R_p99_c64 vs <= 1: $(goal "$R_p99_c64" le 1);" \
  "downtime idle $M_idle, dirty $M_dirty vs <= 0.5: $(goal "$M_idle" le 0.5), $(goal "$M_dirty" le 0.5);" \
  "intruder refused $refused of $attempts"
printf '%s\n' "${RESULTS[@]}"
if [ "$suite" != 0 ]; then
  echo "the intruder suite failed (exit $suite): its output is above" >&2
  tail -40 "$WORK/intruder.out" >&2
  exit 1
fi
