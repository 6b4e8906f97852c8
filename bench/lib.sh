# Shared by the benchmarks and tests/conformance/run.sh (sourced, not run): the peers
# they install, port waits and tgt.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

# libiscsi's tools (iscsi-perf) and tgt, installed when missing.
need_iscsi_tools() {
  if ! command -v iscsi-perf >/dev/null || ! command -v iscsi-test-cu >/dev/null ||
    ! command -v tgtd >/dev/null; then
    echo "installing libiscsi-bin and tgt" >&2
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libiscsi-bin tgt >/dev/null
  fi
}

# A Debian package's installed version, or nothing.
pkgver() { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null | awk '$1 == "ii" {print $2}'; }

# QEMU, the peer of the VMM, migration, network, Linux and backup benchmarks (and the
# tests' emulated KVM host and qemu-img), installed when missing: qemu-utils,
# qemu-block-extra and qemu-system-x86 at one version, in one command. qemu-img's iscsi
# driver is block-extra's module, which loads only into a qemu-utils of its own version
# (qemu-img 10 lists iscsi even without it), and the machine's newer qemu-utils has no
# block-extra of its own, so all three come from Debian together (a downgrade; alone,
# qemu-system-x86 conflicts with it). A benchmark without its peer fails; it prints no
# half table.
qemu_matched() {
  [ -n "$(pkgver qemu-block-extra)" ] && [ "$(pkgver qemu-block-extra)" = "$(pkgver qemu-utils)" ] &&
    [ "$(pkgver qemu-system-x86)" = "$(pkgver qemu-utils)" ]
}
need_qemu() {
  if ! qemu_matched; then
    echo "installing qemu-utils, qemu-block-extra and qemu-system-x86 at one version" >&2
    as_root apt-get update -qq >/dev/null
    local v
    v=$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $2}')
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --allow-downgrades \
      --no-install-recommends "qemu-utils=$v" "qemu-block-extra=$v" "qemu-system-x86=$v" >/dev/null
  fi
  qemu_matched || {
    echo "qemu-utils, qemu-block-extra and qemu-system-x86 are not at one version: nothing to compare against" >&2
    exit 1
  }
}

# A Docker engine and compose (v2 or v1, whichever is there) for the compose pool: Debian's
# docker.io and docker-compose, installed when missing. When no engine answers, dockerd is
# started for this run, logging to $1, and docker_down stops it; an engine that was already
# running is left alone.
dockerd_pid=""
need_docker() {
  local pkgs=()
  command -v dockerd >/dev/null || docker info >/dev/null 2>&1 || pkgs+=(docker.io)
  docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null ||
    pkgs+=(docker-compose)
  if ((${#pkgs[@]})); then
    echo "installing ${pkgs[*]}" >&2
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  docker info >/dev/null 2>&1 && return 0
  # Started directly (not through as_root, a function: `$!` would be the subshell running
  # it, and killing that would leave dockerd behind).
  if [ "$(id -u)" = 0 ]; then
    dockerd --pidfile "$1.pid" >"$1" 2>&1 &
  else
    sudo -n dockerd --pidfile "$1.pid" >"$1" 2>&1 &
  fi
  dockerd_pid=$!
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && return 0
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.5
  done
  tail -20 "$1" >&2
  echo "the Docker engine did not start (log: $1)" >&2
  exit 1
}

docker_down() {
  [ -n "$dockerd_pid" ] || return 0
  kill "$dockerd_pid" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$dockerd_pid" 2>/dev/null || true
  wait "$dockerd_pid" 2>/dev/null || true
  dockerd_pid=""
}

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

tgt_pid=""
# tgt_start WORKDIR PORT IQN IMAGE [LUN-PARAMS]: tgtd on 127.0.0.1:PORT serving IMAGE as
# LUN 1 of target IQN to any initiator (LUN 0 is tgt's controller); its control socket
# lives in WORKDIR. LUN-PARAMS (e.g. thin_provisioning=1) go to the LUN.
tgt_start() {
  export TGT_IPC_SOCKET=$1/tgtd.sock
  tgtd -f --iscsi "portal=127.0.0.1:$2" >"$1/tgt.log" 2>&1 &
  tgt_pid=$!
  wait_port "$2"
  for _ in $(seq 50); do [ -S "$1/tgtd.sock.0" ] && break; sleep 0.1; done
  tgtadm --lld iscsi --op new --mode target --tid 1 -T "$3"
  tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$4"
  if [ -n "${5:-}" ]; then
    tgtadm --lld iscsi --op update --mode logicalunit --tid 1 --lun 1 --params "$5"
  fi
  tgtadm --lld iscsi --op bind --mode target --tid 1 -I ALL
}

# tgtd ignores SIGTERM: take it offline and delete it through its own socket.
tgt_stop() {
  [ -n "$tgt_pid" ] || return 0
  tgtadm --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
  tgtadm --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
  tgtadm --op delete --mode system >/dev/null 2>&1 || true
  for _ in $(seq 50); do kill -0 "$tgt_pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$tgt_pid" 2>/dev/null || true
  wait "$tgt_pid" 2>/dev/null || true
  tgt_pid=""
}

# bench_line KEY INFO_REGEX COMMAND...: runs a benchmark, shows its lines matching
# INFO_REGEX on stderr and prints its `BENCH KEY ...` line; fails, with the output's tail,
# when the command fails or prints no such line (a benchmark prints no partial table).
bench_line() {
  local key=$1 info=$2 out line
  shift 2
  out=$("$@" 2>&1) || {
    echo "$out" | tail -40 >&2
    echo "the $key benchmark failed" >&2
    return 1
  }
  echo "$out" | grep -E "$info" >&2 || true
  line=$(echo "$out" | grep "^BENCH $key " || true)
  if [ -z "$line" ]; then
    echo "$out" | tail -20 >&2
    echo "no $key figure" >&2
    return 1
  fi
  echo "$line"
}
