# One node of the compose pool: a coordinator member and a host agent, and on the node
# with STORAGE=1 the storage box too. Runs under busybox sh; a daemon that exits takes
# the container with it (compose restarts it).
set -eu
: "${MEMBER_ID:?}" "${NODE_IP:?}" "${MEMBERS:?}" "${POOL:?}"
mkdir -p /var/lib/poold /var/lib/hostd /var/lib/storaged
members=""
for m in $MEMBERS; do members="$members --member $m"; done
found=""
[ -d /etc/pool/pki/ca ] && found="--found-ca /etc/pool/pki/ca"
# shellcheck disable=SC2086
poold --member-id "$MEMBER_ID" --listen "$NODE_IP:7101" --pool-id compose \
  --data-dir /var/lib/poold --tls-dir /etc/pool/pki/member \
  --admin-password-file /etc/pool/pki/admin-password $found $members &
if [ "${STORAGE:-0}" = 1 ]; then
  cat >/etc/pool/storaged.toml <<TOML
listen = "$NODE_IP:7300"
iscsi_listen = "$NODE_IP:3260"
state_dir = "/var/lib/storaged"
tls_dir = "/etc/pool/pki/storage"
coordinators = [$(echo "$POOL" | sed 's/[^,]*/"&"/g')]
TOML
  storaged serve --config /etc/pool/storaged.toml &
fi
hostd --listen "$NODE_IP:7000" --run-dir /var/lib/hostd --host-id "node$MEMBER_ID" \
  --initiator-iqn "iqn.2026-11.org.pool.compose:node$MEMBER_ID" --tls-dir /etc/pool/pki/host \
  --image-dir /srv/pool \
  --pool "$POOL" &
# The first daemon to stop ends the node.
wait -n 2>/dev/null || wait
exit 1
