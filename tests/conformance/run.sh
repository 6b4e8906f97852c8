#!/usr/bin/env bash
# The iSCSI conformance run: libiscsi's iscsi-test-cu (every test of the ALL family, each
# in its own process under a timeout, destructive tests on, two initiator names) against
# our target and against tgt, with the same LUN size, side by side.
#
# Ends with:
#   CONFORMANCE ours pass=N fail=N skip=N
#   CONFORMANCE tgt pass=N fail=N skip=N
#   CONFORMANCE regressions=N        (tests that pass on tgt and fail on ours, named above)
# and exits non-zero when there is any regression.
#
# Environment: CONFORMANCE_FILTER=REGEX runs only matching tests (e.g. 'Read10|Write10');
# CONFORMANCE_TIMEOUT=SECONDS per test (default 60); CONFORMANCE_LUN_MB (default 64);
# CONFORMANCE_SKIP_TGT=1 runs ours only; CONFORMANCE_SHOW_FAILURES=1 prints the end of
# each failing test's log under its line.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
if ! command -v iscsi-test-cu >/dev/null || ! command -v tgtd >/dev/null; then
  echo "installing libiscsi-bin and tgt" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libiscsi-bin tgt >/dev/null
fi

timeout_s=${CONFORMANCE_TIMEOUT:-60}
lun_mb=${CONFORMANCE_LUN_MB:-64}
filter=${CONFORMANCE_FILTER:-.}
ours_port=${CONFORMANCE_OURS_PORT:-13261}
tgt_port=${CONFORMANCE_TGT_PORT:-13262}
init1=iqn.2024-01.org.pool.conformance:init1
init2=iqn.2024-01.org.pool.conformance:init2
ours_iqn=iqn.2024-01.org.pool.conformance:ours
tgt_iqn=iqn.2024-01.org.pool.conformance:tgt

work=$(mktemp -d /tmp/iscsi-conformance.XXXXXX)
ours_pid=""
tgt_pid=""
export TGT_IPC_SOCKET=$work/tgtd.sock
cleanup() {
  if [ -n "$ours_pid" ]; then kill "$ours_pid" 2>/dev/null || true; wait "$ours_pid" 2>/dev/null || true; fi
  if [ -n "$tgt_pid" ]; then
    # tgtd ignores SIGTERM: take it offline and delete it through its own socket.
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

echo "building the target" >&2
cargo build -q -p iscsi-target --release --example serve
bin=${CARGO_TARGET_DIR:-$root/target}/release/examples/serve

truncate -s "${lun_mb}M" "$work/ours.img"
"$bin" --file "$work/ours.img" --listen "127.0.0.1:$ours_port" --iqn "$ours_iqn" \
  --pr-dir "$work/pr" >"$work/ours.log" 2>&1 &
ours_pid=$!
wait_port "$ours_port"
ours_url="iscsi://127.0.0.1:$ours_port/$ours_iqn/0"

tgt_url=""
if [ -z "${CONFORMANCE_SKIP_TGT:-}" ]; then
  truncate -s "${lun_mb}M" "$work/tgt.img"
  tgtd -f --iscsi "portal=127.0.0.1:$tgt_port" >"$work/tgt.log" 2>&1 &
  tgt_pid=$!
  wait_port "$tgt_port"
  tgtadm --lld iscsi --op new --mode target --tid 1 -T "$tgt_iqn"
  tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
  tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
  # LUN 0 of a tgt target is its controller; the disk is LUN 1.
  tgt_url="iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1"
fi

mapfile -t tests < <(iscsi-test-cu -l | grep -E '^ALL\.[^.]+\.[^.]+$' | grep -E -- "$filter")
echo "running ${#tests[@]} tests against each target (timeout ${timeout_s}s each)" >&2

# One test in one process: prints pass, fail or skip.
run_one() {
  local url=$1 name=$2 log=$3 rc=0
  timeout -k 5 "$timeout_s" iscsi-test-cu -d -i "$init1" -I "$init2" -t "$name" "$url" >"$log" 2>&1 || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "fail"
  elif grep -qE '^ +tests +[0-9]+ +[0-9]+ +[0-9]+ +[1-9]' "$log" || ! grep -qE '^ +tests +1 +1 ' "$log"; then
    echo "fail"
  elif grep -q '\[SKIPPED\]' "$log"; then
    echo "skip"
  else
    echo "pass"
  fi
}

declare -A ours_res tgt_res
mkdir -p "$work/logs"
printf '%-52s %-6s %-6s\n' TEST OURS TGT
for t in "${tests[@]}"; do
  o=$(run_one "$ours_url" "$t" "$work/logs/ours.$t.log")
  ours_res[$t]=$o
  if [ -n "$tgt_url" ]; then
    g=$(run_one "$tgt_url" "$t" "$work/logs/tgt.$t.log")
  else
    g="-"
  fi
  tgt_res[$t]=$g
  mark=""
  if [ "$g" = pass ] && [ "$o" = fail ]; then mark="  <-- REGRESSION"; fi
  printf '%-52s %-6s %-6s%s\n' "${t#ALL.}" "$o" "$g" "$mark"
  if [ "$o" = fail ] && [ -n "${CONFORMANCE_SHOW_FAILURES:-}" ]; then
    sed -n '/Suite:/,/Run Summary/p' "$work/logs/ours.$t.log" | grep -vE '^\s*$' | tail -15 | sed 's/^/    | /'
  fi
done

count() {
  local -n res=$1
  local p=0 f=0 s=0
  for t in "${tests[@]}"; do
    case ${res[$t]} in pass) p=$((p + 1)) ;; fail) f=$((f + 1)) ;; skip) s=$((s + 1)) ;; esac
  done
  echo "pass=$p fail=$f skip=$s"
}

regressions=0
for t in "${tests[@]}"; do
  if [ "${tgt_res[$t]}" = pass ] && [ "${ours_res[$t]}" = fail ]; then
    echo "REGRESSION $t"
    regressions=$((regressions + 1))
  fi
done
echo "CONFORMANCE ours $(count ours_res)"
if [ -n "$tgt_url" ]; then
  echo "CONFORMANCE tgt $(count tgt_res)"
fi
echo "CONFORMANCE regressions=$regressions"
[ "$regressions" = 0 ]
