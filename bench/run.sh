#!/usr/bin/env bash
# bench/run.sh AREA: runs one area's benchmark, installing any peer it needs, and ends with
# one line per figure: `BENCH <key> <value> <unit>`.
set -euo pipefail
cd "$(dirname "$0")/.."
areas="thin target initiator vmm migration raft pool trust linux net web metrics backup"
area=${1:-}
if [ -z "$area" ] || ! grep -qw -- "$area" <<<"$areas"; then
  echo "usage: bench/run.sh AREA   (AREA: ${areas// /, })" >&2
  exit 2
fi
script="bench/$area.sh"
if [ ! -f "$script" ]; then
  echo "bench area '$area' does not exist yet: its issue has not landed" >&2
  exit 1
fi
exec bash "$script" "${@:2}"
