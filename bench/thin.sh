#!/usr/bin/env bash
# Thin volumes next to a raw file on the same file system (see storaged/benches/thin.rs).
# Prints a table, then BENCH lines: thin_overwrite_ratio, thin_alloc_write_ratio,
# thin_seq_read_ratio, thin_snapshot_scaling, thin_depth100_read_ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
export THIN_BENCH_DIR="${THIN_BENCH_DIR:-$PWD/target/bench-thin}"
cargo bench -q -p storaged --bench thin 2>/dev/null
