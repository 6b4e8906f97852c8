#!/usr/bin/env bash
# deploy/docker/found-pool.sh [DIR]: founds the compose pool's CA in DIR (default
# /srv/pool-pki) and gives each node its TLS directories: DIR/nodeN/member (member N),
# DIR/nodeN/host (host nodeN) and, on node1, DIR/node1/storage. Each node mounts only its
# own DIR/nodeN. Also makes the first admin's password (DIR/admin-password, 0600, copied
# to each node) and writes DIR/client.toml for poolctl. Run it once before `up`; running it
# again keeps the CA and the password and issues fresh certificates.
#
# POOLCTL: the poolctl binary (default target/release/poolctl, or poolctl on PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-/srv/pool-pki}
POOLCTL=${POOLCTL:-$PWD/target/release/poolctl}
[ -x "$POOLCTL" ] || POOLCTL=$(command -v poolctl) || {
  echo "no poolctl: cargo build --release -p poolctl" >&2
  exit 1
}
NET=172.28.0
"$POOLCTL" pki-init "$DIR" --pool-id compose
issue() { "$POOLCTL" pki-issue "$DIR" --pool-id compose "$@" >/dev/null; }
coords=""
for n in 1 2 3; do
  ip=$NET.1$n
  issue --identity "member/$n" --name "$ip" --name "node$n" --out "$DIR/node$n/member"
  issue --identity "host/node$n" --name "$ip" --name "node$n" --out "$DIR/node$n/host"
  coords+="${coords:+, }\"$ip:7101\""
done
issue --identity storage/node1 --name "$NET.11" --name node1 --out "$DIR/node1/storage"
# The pool is founded with its first admin: each member is given the password (0600).
[ -s "$DIR/admin-password" ] || (umask 077 && head -c 18 /dev/urandom | base64 >"$DIR/admin-password")
for n in 1 2 3; do install -m 0600 "$DIR/admin-password" "$DIR/node$n/admin-password"; done
# Node 1's member founds the pool with its CA (kept in the replicated state from then on),
# so `poolctl host-join` can add hosts later.
rm -rf "$DIR/node1/ca" && cp -a "$DIR/ca" "$DIR/node1/ca" && chmod 0700 "$DIR/node1/ca"
printf 'coordinators = [%s]\nca = "%s"\n' "$coords" "$DIR/ca.pem" >"$DIR/client.toml"
echo "founded: poolctl --config $DIR/client.toml login admin --password-file $DIR/admin-password"
