#!/usr/bin/env bash
# bench/pool.sh: the whole pool with real processes (release build).
#   ha_restart_s  from SIGKILL of a host running an HA-protected VM until the pool shows the
#                 VM running on another host (heartbeat and HA timeouts 2 s, fencing at
#                 storaged, placement, boot); median of HA_RUNS runs (default 10).
#   lab_ready_s   `poolctl lab` from an empty directory until it prints that the lab is
#                 ready (3 coordinators, storaged, 3 hosts joined, SR, template, demo VM).
#   compose_ha_restart_s         the compose pool (deploy/docker-compose.yml, three
#                 containers): from `docker kill` of the node running an HA VM until the
#                 pool shows the VM running on another node; median of COMPOSE_RUNS
#                 kills (default 5), in one run of tests/tests/compose.rs.
#   compose_partition_recover_s  from `docker network connect` of the node that was cut
#                 off until it is enabled again with its stale copy stopped and the VM
#                 running once, elsewhere.
#   metrics_scrape_ms            a full `/metrics` of a host running 50 VMs
#                 (bench/metrics.sh, also its own area).
# Installs Debian's Docker engine and compose when missing and starts dockerd for the
# run if none answers (stopped at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
runs=${HA_RUNS:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p poold -p storaged -p hostd -p poolctl -p iscsi-initiator --features iscsi-initiator/cli --bins
cargo test --release -q -p e2e-tests --test pool --no-run

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) exit 1; if (NR%2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2]+a[NR/2+1])/2}'; }

ha=()
for i in $(seq "$runs"); do
  out=$(cargo test --release -q -p e2e-tests --test pool ha_restarts -- --nocapture 2>&1) || {
    echo "$out" | tail -40 >&2
    echo "HA run $i failed" >&2
    exit 1
  }
  v=$(echo "$out" | awk '/^BENCH ha_restart_s/ {print $3}')
  echo "run $i: ha_restart_s $v" >&2
  ha+=("$v")
done

dir=$(mktemp -d)
trap 'rm -rf "$dir"; docker_down' EXIT
lab=$("$CARGO_TARGET_DIR/release/poolctl" lab --dir "$dir" --exit-when-ready 2>"$dir.err") || {
  tail -20 "$dir.err" >&2
  echo "the lab did not start" >&2
  exit 1
}
rm -f "$dir.err"
ready=$(echo "$lab" | awk '/^LAB READY/ {print $3}')

need_docker "$dir/dockerd.log"
cargo test --release -q -p e2e-tests --test compose --no-run
out=$(COMPOSE_HA_RUNS=${COMPOSE_RUNS:-5} cargo test --release -q -p e2e-tests --test compose -- --nocapture 2>&1) || {
  echo "$out" | tail -60 >&2
  echo "the compose run failed" >&2
  exit 1
}
kills=$(echo "$out" | awk '/^BENCH compose_ha_restart_s/ {print $3}')
echo "compose kills: $(echo $kills)" >&2
compose_ha=$(echo "$kills" | median)
recover=$(echo "$out" | awk '/^BENCH compose_partition_recover_s/ {print $3}')
[ -n "$recover" ] || { echo "no partition figure from the compose run" >&2; exit 1; }

scrape=$(bash bench/metrics.sh | awk '/^BENCH metrics_scrape_ms/ {print $3}')
[ -n "$scrape" ] || { echo "no scrape figure" >&2; exit 1; }

echo "BENCH ha_restart_s $(printf '%s\n' "${ha[@]}" | median) s"
echo "BENCH lab_ready_s $ready s"
echo "BENCH compose_ha_restart_s $compose_ha s"
echo "BENCH compose_partition_recover_s $recover s"
echo "BENCH metrics_scrape_ms $scrape ms"
