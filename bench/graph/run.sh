#!/usr/bin/env bash
# Graph benchmark: the seed's three load scenarios through mailbridge's real
# pipeline against the in-repo fake Graph (2–3 s per request, 4 in flight),
# time-scaled. See bench/graph/README.md. Prints a Markdown table.
#
# usage: bash bench/graph/run.sh [--scale N] [--scenarios 1,2,3] [--baseline] [--s1-minutes M] [--image-bytes B] [--ews]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRATE=$(cd "$HERE/../.." && pwd)
while [ $# -gt 0 ]; do
    case "$1" in
        --scale) export GRAPH_BENCH_SCALE=$2; shift 2 ;;
        --scenarios) export GRAPH_BENCH_SCENARIOS=$2; shift 2 ;;
        --baseline) export GRAPH_BENCH_BASELINE=1; shift ;;
        --s1-minutes) export GRAPH_BENCH_S1_MINUTES=$2; shift 2 ;;
        --image-bytes) export GRAPH_BENCH_IMAGE_BYTES=$2; shift 2 ;;
        --ews) EWS=1; shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 64 ;;
    esac
done
cd "$CRATE"
if [ "${EWS:-0}" = 1 ]; then
    exec cargo test --release --test graph_bench ews_back_off -- --ignored --nocapture --test-threads 1
fi
exec cargo test --release --test graph_bench graph_scenarios -- --ignored --nocapture --test-threads 1
