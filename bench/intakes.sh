#!/usr/bin/env bash
# Core vs JetStream intake, same workload and run: `rerank bench --mode nats` with 1, 8 and 64
# callers against one worker per intake on a local nats-server with JetStream (loopback only).
#
#   bench/intakes.sh [MODEL_DIR] [REQUESTS]     # defaults: the tiny test model, 200 requests
#   BENCH_ARGS="--workload custom --documents 2 --min-tokens 16 --max-tokens 32" bench/intakes.sh
#
# With the tiny model the device work is small, so the figures show the transport's own cost
# (what JetStream adds); point MODEL_DIR at the real model on a GPU for end-to-end numbers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-$ROOT/tests/fixtures/tiny-model}"
REQUESTS="${2:-200}"
RERANK="${RERANK_BIN:-$ROOT/target/release/rerank}"
[ -x "$RERANK" ] || RERANK="$ROOT/target/debug/rerank"
NATS_SERVER="${NATS_SERVER_BIN:-$ROOT/.tools/nats/bin/nats-server}"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port="$(free_port)"
url="nats://127.0.0.1:$port"
"$NATS_SERVER" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >"$work/nats.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do grep -q "Server is ready" "$work/nats.log" && break; sleep 0.1; done
start_worker() {
  local hp; hp="$(free_port)"
  RUST_LOG=warn "$RERANK" worker --model "$MODEL" --nats-url "$url" --health-listen "127.0.0.1:$hp" "$@" & pids+=($!)
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$hp/ready")" = 200 ] && return; sleep 0.1
  done
  echo "worker not ready" >&2; exit 1
}
start_worker --intake core
start_worker --intake jetstream
for callers in 1 8 64; do
  for intake in core jetstream; do
    "$RERANK" bench --mode nats --intake "$intake" --nats-url "$url" --concurrency "$callers" \
      --requests "$REQUESTS" --warmup-requests 16 ${BENCH_ARGS:---workload seed}
  done
done
