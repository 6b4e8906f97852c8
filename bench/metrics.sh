#!/usr/bin/env bash
# bench/metrics.sh: a Prometheus scrape of a host (release build).
#   metrics_scrape_ms  one full `GET /metrics` of a hostd running METRICS_VMS VMs (default
#                      50: the test guest in its own VM process, 16 MiB and a 4 MiB file
#                      disk each, beating every second), as curl times it with a monitor's
#                      certificate (connection and TLS handshake included); median of
#                      METRICS_SCRAPES scrapes (default 11). hostd/tests/metrics.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo test --release -q -p hostd --test metrics --no-run

bench_line metrics_scrape_ms '^scrape ' \
  cargo test --release -q -p hostd --test metrics -- --ignored --nocapture
