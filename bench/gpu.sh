#!/usr/bin/env bash
# Run on the GPU machine (one device call): the PyTorch baseline and our benchmarks on the same card,
# in one go. Expects the CUDA binary at target/cuda/rerank-cuda(.xz) (built here by `make cuda`) and
# the tokenizer at tests/fixtures/tokenizer/tokenizer.json. Writes JSON lines to $OUT (or bench/out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
BIN=target/cuda/rerank-cuda
[[ -x $BIN ]] || { xz -dc target/cuda/rerank-cuda.xz > "$BIN"; chmod +x "$BIN"; }
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
TOK=tests/fixtures/tokenizer/tokenizer.json
COMMON=(--random-weights --tokenizer "$TOK" --device cuda --dtype bf16 --max-length 512)

# 4. Exactness on the GPU: the tiny golden model in bf16 vs the CPU f32 golden (|Δ| <= 0.05).
python3 - "$BIN" <<'PY' | tee "$OUT/exactness.$CARD.json"
import json, subprocess, sys
golden = json.load(open("tests/fixtures/golden.json"))
worst = 0.0
for case in golden["cases"]:
    out = subprocess.run([sys.argv[1], "score", "--model", "tests/fixtures/tiny-model", "--device", "cuda",
                          "--dtype", "bf16", "--max-length", str(case["max_length"])],
                         input=json.dumps({"query": case["query"], "documents": case["documents"]}),
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)["scores"]
    worst = max(worst, max(abs(a - b) for a, b in zip(got, case["scores"])))
print(json.dumps({"check": "gpu_bf16_vs_golden_f32", "max_abs_diff": worst, "ok": worst <= 0.05}))
PY

# 1–3. Our engine: one seed-shaped request at a time, saturated mixed load, 100 x 512.
"$BIN" bench "${COMMON[@]}" --workload seed --concurrency 1 --requests 200 | tee "$OUT/rerank.$CARD.jsonl"
"$BIN" bench "${COMMON[@]}" --workload seed --concurrency 64 --requests 2000 | tee -a "$OUT/rerank.$CARD.jsonl"
"$BIN" bench "${COMMON[@]}" --workload long --concurrency 1 --requests 20 | tee -a "$OUT/rerank.$CARD.jsonl"

# 1 end to end: through NATS to one worker (nats-server from .tools, started on loopback).
NATS=.tools/nats/bin/nats-server
if [[ -x $NATS ]]; then
  $NATS -a 127.0.0.1 -p 4333 & NATS_PID=$!
  "$BIN" worker "${COMMON[@]}" --nats-url nats://127.0.0.1:4333 --health-listen 127.0.0.1:8302 & W=$!
  for _ in $(seq 120); do curl -sf localhost:8302/ready >/dev/null && break; sleep 1; done
  "$BIN" bench --mode nats --nats-url nats://127.0.0.1:4333 --workload seed --concurrency 1 --requests 200 | tee -a "$OUT/rerank.$CARD.jsonl"
  kill -TERM $W; wait $W || true; kill $NATS_PID || true
fi

# The PyTorch baseline on the same card, same call.
python3 ../shared/gpu/torch_baseline.py | tee "$OUT/torch_baseline.$CARD.jsonl" || \
  python3 bench/torch_baseline.py | tee "$OUT/torch_baseline.$CARD.jsonl"
