#!/usr/bin/env bash
# CPU benchmark (issue 15): `rerank bench --mode engine` against the seed-style PyTorch service
# (bench/torch_cpu_baseline.py: transformers fp32 eager, 2 threads, each request padded to its
# longest pair) on the same random mid-size model (hidden 384, 6 layers, 6/2 heads, intermediate
# 1536, real Llama 3.2 tokenizer) and the same seed-shaped requests, in one run, alternating the
# two sides so both see the same machine load. Not part of `make test`.
#
# Needs: a release binary (cargo build --release), the tokenizer (make setup) and a Python venv with
# torch, transformers and safetensors (default .tools/torch-venv; see bench/README.md).
# Writes JSON lines and a summary to $OUT (default bench/out); commit them under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
BIN=${BIN:-target/release/rerank}
PY=${PY:-.tools/torch-venv/bin/python}
REQUESTS=${REQUESTS:-40}
ROUNDS=${ROUNDS:-2}
MACHINE=${MACHINE:-$(nproc)cpu-$(lscpu | sed -n 's/^Model name: *//p' | tr -c 'A-Za-z0-9\n' '_' | tr -s '_')}
TOK=tests/fixtures/tokenizer/tokenizer.json
MODEL=$OUT/mid-model
RESULT=$OUT/cpu.$MACHINE.jsonl
mkdir -p "$OUT"
[[ -f $MODEL/model.safetensors ]] || "$PY" bench/torch_cpu_baseline.py export "$MODEL" --tokenizer "$TOK"
: > "$RESULT"

# 1. Exactness on the benchmark's own pairs: our scores vs PyTorch's (max |Δ|).
"$PY" bench/torch_cpu_baseline.py bench "$MODEL" --requests 2 --warmup-requests 0 \
  --scores-out "$OUT/torch_scores.jsonl" > /dev/null
python3 - "$BIN" "$MODEL" "$OUT/torch_scores.jsonl" <<'PY' | tee -a "$RESULT"
import json, subprocess, sys
binary, model, path = sys.argv[1:]
worst, pairs = 0.0, 0
for line in open(path):
    case = json.loads(line)
    out = subprocess.run([binary, "score", "--model", model, "--device", "cpu"],
                         input=json.dumps({"query": case["query"], "documents": case["documents"]}),
                         capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout)["scores"]
    worst = max(worst, max(abs(a - b) for a, b in zip(ours, case["scores"])))
    pairs += len(ours)
print(json.dumps({"check": "rerank_vs_torch_scores", "pairs": pairs, "max_abs_diff": worst}))
PY

# 2. Speed: each concurrency, each side, ROUNDS times, alternating.
for round in $(seq "$ROUNDS"); do
  for c in 1 8; do
    "$BIN" bench --model "$MODEL" --device cpu --workload seed --concurrency "$c" \
      --requests "$REQUESTS" | sed "s/^{/{\"round\":$round,/" | tee -a "$RESULT"
    "$PY" bench/torch_cpu_baseline.py bench "$MODEL" --concurrency "$c" --requests "$REQUESTS" \
      | sed "s/^{/{\"round\":$round,/" | tee -a "$RESULT"
  done
done

# 3. Ratios per round (ours / torch): pairs/s at 8 callers, p50 at 1 caller.
python3 - "$RESULT" <<'PY' | tee "$OUT/cpu.$MACHINE.summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"round"' in l]
print("| round | callers | rerank pairs/s | torch pairs/s | ratio | rerank p50 ms | torch p50 ms | p50 ratio | rerank padding | torch padding |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in sorted({x["round"] for x in rows}):
    for c in (1, 8):
        ours = next(x for x in rows if x["round"] == r and x["concurrency"] == c and x["mode"] == "engine")
        theirs = next(x for x in rows if x["round"] == r and x["concurrency"] == c and x["mode"] == "torch")
        assert ours["real_tokens"] == theirs["real_tokens"], "the two sides scored different tokens"
        print(f"| {r} | {c} | {ours['pairs_per_s']:.1f} | {theirs['pairs_per_s']:.1f} | "
              f"{ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x | {ours['latency_ms']['p50']:.0f} | "
              f"{theirs['latency_ms']['p50']:.0f} | {ours['latency_ms']['p50'] / theirs['latency_ms']['p50']:.2f} | "
              f"{ours['padding_overhead']:.2f} | {theirs['padding_overhead']:.2f} |")
PY
