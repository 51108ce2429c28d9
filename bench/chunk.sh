#!/usr/bin/env bash
# Cost of one document scored as 20 CHUNK windows against 20 separate documents of one window's
# size, in one run (alternating, twice), on the engine. Usage: bench/chunk.sh [MODEL_DIR]
# (default: the tiny test model). Prints one JSON line per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/rerank}
MODEL=${1:-tests/fixtures/tiny-model}
REQUESTS=${REQUESTS:-20}
for round in 1 2; do
  # ~8,800 tokens: 20 windows of ~500 document tokens overlapping by 64 under max_length 512.
  "$BIN" bench --mode engine --model "$MODEL" --workload custom --documents 1 \
    --min-tokens 8800 --max-tokens 8800 --truncate CHUNK --max-chunks-per-doc 20 \
    --requests "$REQUESTS" | sed "s/^{/{\"round\":$round,\"shape\":\"1 document, 20 windows\",/"
  "$BIN" bench --mode engine --model "$MODEL" --workload custom --documents 20 \
    --min-tokens 510 --max-tokens 510 \
    --requests "$REQUESTS" | sed "s/^{/{\"round\":$round,\"shape\":\"20 documents\",/"
done
