#!/usr/bin/env bash
# The iSCSI conformance run: libiscsi's iscsi-test-cu (every test of the ALL family, each
# in its own process under a timeout, destructive tests on, two initiator names) against
# three targets with the same LUN size, side by side:
#   file  our target (iscsi-target's serve example) on a plain file LUN
#   thin  our target inside storaged, serving a thin volume of a thin pool (the product)
#   tgt   tgt, the reference
# The three run each test at the same time (separate targets, separate LUNs), so the
# wall time is that of the slowest column, not the sum.
#
# Ends with:
#   CONFORMANCE ours pass=N fail=N skip=N      (file LUN)
#   CONFORMANCE thin pass=N fail=N skip=N      (storaged thin volume)
#   CONFORMANCE tgt pass=N fail=N skip=N
#   CONFORMANCE regressions=N   (tests that pass on tgt and fail on file or on thin; each
#                                named above as "REGRESSION file|thin TEST")
# and exits non-zero when there is any regression. A test that passes on the file LUN and
# fails on the thin volume is named "THIN-ONLY FAILURE TEST" (not a regression unless tgt
# passes it).
#
# Environment: CONFORMANCE_FILTER=REGEX runs only matching tests (e.g. 'Read10|Write10');
# CONFORMANCE_TIMEOUT=SECONDS per test (default 60); CONFORMANCE_LUN_MB (default 64);
# CONFORMANCE_SKIP_TGT=1 / CONFORMANCE_SKIP_THIN=1 leave a column out;
# CONFORMANCE_SHOW_FAILURES=1 prints the end of each failing test's log (ours) under its
# line; CONFORMANCE_PROFILE=release|dev (default dev: CI's `cargo test` already built
# both binaries in that profile, so nothing is compiled again).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
started=$(date +%s)

# as_root, need_iscsi_tools, wait_port, tgt_start and tgt_stop.
source "$root/bench/lib.sh"
need_iscsi_tools

timeout_s=${CONFORMANCE_TIMEOUT:-60}
lun_mb=${CONFORMANCE_LUN_MB:-64}
filter=${CONFORMANCE_FILTER:-.}
profile=${CONFORMANCE_PROFILE:-dev}
ours_port=${CONFORMANCE_OURS_PORT:-13261}
tgt_port=${CONFORMANCE_TGT_PORT:-13262}
thin_port=${CONFORMANCE_THIN_PORT:-13263}
init1=iqn.2024-01.org.pool.conformance:init1
init2=iqn.2024-01.org.pool.conformance:init2
ours_iqn=iqn.2024-01.org.pool.conformance:ours
tgt_iqn=iqn.2024-01.org.pool.conformance:tgt
thin_iqn=iqn.2024-01.org.pool.conformance:thin

work=$(mktemp -d /tmp/iscsi-conformance.XXXXXX)
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

echo "building the target and storaged ($profile profile)" >&2
packages=(-p iscsi-target --example serve)
[ -n "${CONFORMANCE_SKIP_THIN:-}" ] || packages+=(-p storaged --bin storaged -p poolctl --bin poolctl)
cargo build -q --profile "$profile" "${packages[@]}"
outdir=${CARGO_TARGET_DIR:-$root/target}/$([ "$profile" = dev ] && echo debug || echo "$profile")
bin=$outdir/examples/serve
storaged=$outdir/storaged

truncate -s "${lun_mb}M" "$work/ours.img"
"$bin" --file "$work/ours.img" --listen "127.0.0.1:$ours_port" --iqn "$ours_iqn" \
  --pr-dir "$work/pr" >"$work/ours.log" 2>&1 &
ours_pid=$!
wait_port "$ours_port"
ours_url="iscsi://127.0.0.1:$ours_port/$ours_iqn/0"

thin_url=""
if [ -z "${CONFORMANCE_SKIP_THIN:-}" ]; then
  # A pool with room for the whole volume four times over (EXTENDED COPY and WRITE SAME
  # tests write all of it), one volume of the LUN size, exported to both initiators.
  "$storaged" pool create --file "$work/pool.img" --size "$((lun_mb * 4 + 64))M" >/dev/null
  "$storaged" volume create --file "$work/pool.img" --name lun0 --size "${lun_mb}M" >/dev/null
  "$storaged" export create --file "$work/pool.img" lun0 --target-iqn "$thin_iqn" \
    --allow "$init1" --allow "$init2" >/dev/null
  # storaged serves StorageService on mutual TLS only: a CA and a storage certificate.
  "$outdir/poolctl" pki-init "$work/pki" --pool-id conformance >/dev/null
  "$outdir/poolctl" pki-issue "$work/pki" --pool-id conformance --identity storage/thin \
    --name 127.0.0.1 --out "$work/pki/storaged" >/dev/null
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
  wait_port "$thin_port"
  thin_url="iscsi://127.0.0.1:$thin_port/$thin_iqn/0"
fi

tgt_url=""
if [ -z "${CONFORMANCE_SKIP_TGT:-}" ]; then
  truncate -s "${lun_mb}M" "$work/tgt.img"
  # Thin provisioning on, as the issue measured tgt: its UNMAP and GET LBA STATUS tests run.
  tgt_start "$work" "$tgt_port" "$tgt_iqn" "$work/tgt.img" thin_provisioning=1
  # LUN 0 of a tgt target is its controller; the disk is LUN 1.
  tgt_url="iscsi://127.0.0.1:$tgt_port/$tgt_iqn/1"
fi

mapfile -t tests < <(iscsi-test-cu -l | grep -E '^ALL\.[^.]+\.[^.]+$' | grep -E -- "$filter")
echo "running ${#tests[@]} tests against each target (timeout ${timeout_s}s each)" >&2
tests_started=$(date +%s)

# One test in one process: writes pass, fail or skip to $4 (and its log to $3).
run_one() {
  local url=$1 name=$2 log=$3 res=$4 rc=0 r
  if [ -z "$url" ]; then
    echo "-" >"$res"
    return
  fi
  timeout -k 5 "$timeout_s" iscsi-test-cu -d -i "$init1" -I "$init2" -t "$name" "$url" >"$log" 2>&1 || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    r=fail
  elif grep -qE '^ +tests +[0-9]+ +[0-9]+ +[0-9]+ +[1-9]' "$log" || ! grep -qE '^ +tests +1 +1 ' "$log"; then
    r=fail
  elif grep -q '\[SKIPPED\]' "$log"; then
    r=skip
  else
    r=pass
  fi
  echo "$r" >"$res"
}

show_failure() {
  sed -n '/Suite:/,/Run Summary/p' "$1" | grep -vE '^\s*$' | tail -15 | sed "s/^/    $2| /"
}

declare -A ours_res thin_res tgt_res
mkdir -p "$work/logs"
printf '%-52s %-6s %-6s %-6s\n' TEST FILE THIN TGT
for t in "${tests[@]}"; do
  run_one "$ours_url" "$t" "$work/logs/ours.$t.log" "$work/logs/ours.$t.res" &
  a=$!
  run_one "$thin_url" "$t" "$work/logs/thin.$t.log" "$work/logs/thin.$t.res" &
  b=$!
  run_one "$tgt_url" "$t" "$work/logs/tgt.$t.log" "$work/logs/tgt.$t.res" &
  c=$!
  wait "$a" "$b" "$c" || true
  o=$(cat "$work/logs/ours.$t.res")
  n=$(cat "$work/logs/thin.$t.res")
  g=$(cat "$work/logs/tgt.$t.res")
  ours_res[$t]=$o
  thin_res[$t]=$n
  tgt_res[$t]=$g
  mark=""
  if [ "$g" = pass ] && { [ "$o" = fail ] || [ "$n" = fail ]; }; then
    mark="  <-- REGRESSION"
  elif [ "$o" = pass ] && [ "$n" = fail ]; then
    mark="  <-- fails on thin only"
  elif [ "$o" = pass ] && [ "$n" = skip ]; then
    mark="  (skipped on thin only)"
  fi
  printf '%-52s %-6s %-6s %-6s%s\n' "${t#ALL.}" "$o" "$n" "$g" "$mark"
  if [ -n "${CONFORMANCE_SHOW_FAILURES:-}" ]; then
    if [ "$o" = fail ]; then show_failure "$work/logs/ours.$t.log" file; fi
    if [ "$n" = fail ]; then show_failure "$work/logs/thin.$t.log" thin; fi
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
  if [ "${ours_res[$t]}" = pass ] && [ "${thin_res[$t]}" = fail ]; then
    echo "THIN-ONLY FAILURE $t"
  fi
done
for t in "${tests[@]}"; do
  [ "${tgt_res[$t]}" = pass ] || continue
  if [ "${ours_res[$t]}" = fail ]; then
    echo "REGRESSION file $t"
    regressions=$((regressions + 1))
  fi
  if [ "${thin_res[$t]}" = fail ]; then
    echo "REGRESSION thin $t"
    regressions=$((regressions + 1))
  fi
done
now=$(date +%s)
echo "conformance: tests took $((now - tests_started))s, the whole run $((now - started))s" >&2
echo "CONFORMANCE ours $(count ours_res)"
if [ -n "$thin_url" ]; then
  echo "CONFORMANCE thin $(count thin_res)"
fi
if [ -n "$tgt_url" ]; then
  echo "CONFORMANCE tgt $(count tgt_res)"
fi
echo "CONFORMANCE regressions=$regressions"
[ "$regressions" = 0 ]
