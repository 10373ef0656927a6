#!/usr/bin/env bash
# Three `mailbridge run` processes sharing one mailbox's Graph budget through
# a real redis-server (the seed's scenario 3 split across them), against the
# in-repo fake Graph (4 in flight per mailbox across all clients). Prints one
# Markdown table row per latency. See bench/README.md ("Three instances").
#
# usage: bash bench/graph/instances.sh [--latency-ms "125 1000 2500"] [--messages 600] [--release]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRATE=$(cd "$HERE/../.." && pwd)
LATENCIES="125 1000"
MESSAGES=600
PROFILE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --latency-ms) LATENCIES=$2; shift 2 ;;
        --messages) MESSAGES=$2; shift 2 ;;
        --release) PROFILE=(--release); shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "instances.sh: unknown option $1" >&2; exit 64 ;;
    esac
done
command -v redis-server >/dev/null || { echo "instances.sh: redis-server is not installed" >&2; exit 69; }
cd "$CRATE"
for ms in $LATENCIES; do
    INSTANCES_BENCH_LATENCY_MS=$ms INSTANCES_BENCH_MESSAGES=$MESSAGES \
        cargo test "${PROFILE[@]}" --test throttle_instances bench_three_processes \
        -- --ignored --nocapture --test-threads 1
done
