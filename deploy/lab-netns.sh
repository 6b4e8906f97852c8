#!/usr/bin/env bash
# deploy/lab-netns.sh: the pool on one machine with a network stack per host, so links can
# be cut like cables (partitions, fencing) — unlike `poolctl lab`, where every daemon shares
# the loopback.
#
#   deploy/lab-netns.sh up   [DIR]   bridge poolbr0 (10.77.0.1/24), network namespaces
#                                    pool-h1..pool-hN (10.77.0.11..), 3 poold and storaged
#                                    in the root namespace, one hostd per namespace that
#                                    joins the pool by itself; then an SR on a sparse file
#   deploy/lab-netns.sh cut  N       take host N's link down (it stops heartbeating)
#   deploy/lab-netns.sh heal N       bring it back
#   deploy/lab-netns.sh down [DIR]   stop every daemon it started (by pid), remove the
#                                    namespaces and the bridge
#
# Needs root and iproute2. Binaries come from $BIN (default target/release; build them with
# `cargo build --release -p poold -p storaged -p hostd -p poolctl`). HOSTS (default 3).
# IMAGE_DIR (default /srv/pool): where guests' kernels are.
# Every link is mutual TLS: `up` founds the pool's CA in DIR/pki (poolctl pki-init) and
# gives each daemon its TLS directory (pki-issue).
# Then: poolctl --config DIR/client.toml host-list
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/target/release}
HOSTS=${HOSTS:-3}
# Where VMs' kernels and file disks may come from (hostd refuses any other path).
IMAGE_DIR=${IMAGE_DIR:-/srv/pool}
BR=poolbr0
NET=10.77.0
POOL="$NET.1:7101,$NET.1:7102,$NET.1:7103"
cmd=${1:-}
DIR=${2:-/tmp/pool-netns-lab}

die() { echo "lab-netns: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"

start() { # name, command...: runs it in the background, logs and pid under $DIR
  local name=$1; shift
  "$@" >"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$DIR/pids/$name"
}

wait_port() { # [netns] host port
  local ns=() ; if [ $# = 3 ]; then ns=(ip netns exec "$1"); shift; fi
  for _ in $(seq 100); do
    "${ns[@]}" bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing listens on $1:$2; see $DIR/logs"
}

# Frames between the lab's namespaces cross the bridge; where br_netfilter is loaded
# they also cross iptables' FORWARD chain, whose policy a Docker engine sets to DROP.
# The lab lets its own bridge's traffic through (and takes the rule back on `down`);
# without iptables there is no such policy to pass.
forwarding() { # -I|-D bridge
  command -v iptables >/dev/null || return 0
  local rule=(FORWARD -i "$2" -o "$2" -j ACCEPT)
  if [ "$1" = -I ]; then
    iptables -C "${rule[@]}" 2>/dev/null || iptables -I "${rule[@]}" \
      || echo "lab-netns: iptables refused to let $2 forward; traffic across it may drop" >&2
  else
    while iptables -C "${rule[@]}" 2>/dev/null; do iptables -D "${rule[@]}"; done
  fi
}

up() {
  for b in poold storaged hostd poolctl; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing: cargo build --release -p poold -p storaged -p hostd -p poolctl"
  done
  mkdir -p "$DIR/logs" "$DIR/pids"
  ip link show "$BR" >/dev/null 2>&1 || {
    ip link add "$BR" type bridge
    ip addr add "$NET.1/24" dev "$BR"
    ip link set "$BR" up
  }
  forwarding -I "$BR"
  for i in $(seq "$HOSTS"); do
    ns=pool-h$i
    ip netns list | grep -qw "$ns" && continue
    ip netns add "$ns"
    ip link add "vh$i" type veth peer name eth0 netns "$ns"
    ip link set "vh$i" master "$BR" up
    ip -n "$ns" addr add "$NET.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  local pki=("$BIN/poolctl" pki-issue "$DIR/pki" --pool-id netns)
  "$BIN/poolctl" pki-init "$DIR/pki" --pool-id netns >/dev/null
  for m in 1 2 3; do
    "${pki[@]}" --identity "member/$m" --name "$NET.1" --out "$DIR/pki/member-$m" >/dev/null
  done
  "${pki[@]}" --identity storage/storaged --name "$NET.1" --out "$DIR/pki/storaged" >/dev/null
  for i in $(seq "$HOSTS"); do
    "${pki[@]}" --identity "host/h$i" --name "$NET.1$i" --out "$DIR/pki/h$i" >/dev/null
  done
  # The pool is founded with its first admin; the password stays in the 0700 pki directory.
  [ -s "$DIR/pki/admin-password" ] ||
    (umask 077 && head -c 18 /dev/urandom | base64 >"$DIR/pki/admin-password")
  local coords=""
  for m in 1 2 3; do coords+="${coords:+, }\"$NET.1:710$m\""; done
  (umask 077 && printf 'coordinators = [%s]\nca = "%s"\n' "$coords" "$DIR/pki/ca.pem" \
    >"$DIR/client.toml")
  local members=()
  for m in 1 2 3; do members+=(--member "$m=$NET.1:710$m"); done
  for m in 1 2 3; do
    start "poold-$m" "$BIN/poold" --member-id "$m" --listen "$NET.1:710$m" --pool-id netns \
      --data-dir "$DIR/poold-$m" --tls-dir "$DIR/pki/member-$m" \
      --admin-password-file "$DIR/pki/admin-password" --found-ca "$DIR/pki" "${members[@]}"
  done
  mkdir -p "$DIR/storaged"
  cat >"$DIR/storaged/storaged.toml" <<TOML
listen = "$NET.1:7300"
iscsi_listen = "$NET.1:3260"
state_dir = "$DIR/storaged/state"
tls_dir = "$DIR/pki/storaged"
coordinators = [$coords]
TOML
  start storaged "$BIN/storaged" --log info serve --config "$DIR/storaged/storaged.toml"
  for m in 1 2 3; do wait_port "$NET.1" "710$m"; done
  wait_port "$NET.1" 7300
  for i in $(seq "$HOSTS"); do
    mkdir -p "$DIR/h$i"
    start "h$i" ip netns exec "pool-h$i" "$BIN/hostd" --listen "$NET.1$i:7000" --tie-vms \
      --host-id "h$i" --run-dir "$DIR/h$i" --initiator-iqn "iqn.2026-11.org.pool.netns:h$i" \
      --tls-dir "$DIR/pki/h$i" --image-dir "$IMAGE_DIR" --pool "$POOL"
  done
  for i in $(seq "$HOSTS"); do wait_port "pool-h$i" "$NET.1$i" 7000; done
  local ctl=("$BIN/poolctl" --config "$DIR/client.toml")
  # Log in once the leader has made the admin (until then the pool answers anyone), and
  # keep the token in the client configuration (0600).
  for _ in $(seq 100); do
    "${ctl[@]}" member-list 2>&1 | grep -q Unauthenticated && break
    sleep 0.2
  done
  local token
  token=$("${ctl[@]}" login admin --password-file "$DIR/pki/admin-password" 2>/dev/null | head -1)
  [ -n "$token" ] || die "cannot log in as admin; see $DIR/logs"
  printf 'token = "%s"\n' "$token" >>"$DIR/client.toml"
  for _ in $(seq 100); do
    [ "$("${ctl[@]}" host-list 2>/dev/null | grep -c enabled)" = "$HOSTS" ] && break
    sleep 0.2
  done
  "${ctl[@]}" host-list
  "${ctl[@]}" sr-list | grep -qw netns-sr ||
    "${ctl[@]}" sr-create netns-sr "$NET.1:7300" --file "$DIR/netns-sr.img" --size 8G
  echo "up: poolctl --config $DIR/client.toml ...; logs in $DIR/logs; '$0 down $DIR' stops it"
}

down() {
  if [ -d "$DIR/pids" ]; then
    # Hosts first (they stop their VMs), then storage, then the coordinators.
    for group in 'h*' 'storaged' 'poold-*'; do
      for f in "$DIR"/pids/$group; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$f"
      done
    done
  fi
  for i in $(seq 9); do
    ip netns list | grep -qw "pool-h$i" && ip netns del "pool-h$i"
    # Deleting the namespace takes its veth end, and so the peer, away asynchronously:
    # the peer may vanish between the test and the delete.
    ip link show "vh$i" >/dev/null 2>&1 && { ip link del "vh$i" 2>/dev/null || true; }
  done
  ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
  forwarding -D "$BR"
  echo "down"
}

case "$cmd" in
  up) up ;;
  down) down ;;
  cut) ip link set "vh${2:?host number}" down ;;
  heal) ip link set "vh${2:?host number}" up ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
