#!/usr/bin/env bash
# Proves the proto crate builds with no system protoc: PROTOC is unset and the only
# `protoc` on PATH is a trap that fails the build if anything calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
trap_dir=$(mktemp -d)
trap 'rm -rf "$trap_dir"' EXIT
cat >"$trap_dir/protoc" <<'TRAP'
#!/bin/sh
echo "protoc was called ($*): the build must not need a system protoc" >&2
exit 1
TRAP
chmod +x "$trap_dir/protoc"
# Keep cargo and rustc reachable, drop every other directory that could hold a protoc.
cargo_bin=$(dirname "$(command -v cargo)")
touch proto/build.rs   # make cargo run the build script again
env -u PROTOC PATH="$trap_dir:$cargo_bin:/usr/bin:/bin" sh -c '
  for d in $(echo "$PATH" | tr : " "); do
    [ "$d" = "'"$trap_dir"'" ] && continue
    [ -x "$d/protoc" ] && { echo "a real protoc is at $d/protoc; cannot prove its absence" >&2; exit 1; }
  done
  exec cargo build -q -p proto'
echo "proto built with PROTOC unset and no protoc on PATH"
