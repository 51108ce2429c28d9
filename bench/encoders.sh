#!/usr/bin/env bash
# Encoder rerankers on the CPU (issue 13, "Speed on the CPU"): `rerank bench --mode engine` against
# sentence-transformers' CrossEncoder hot path (bench/torch_cpu_baseline.py: transformers
# AutoModelForSequenceClassification fp32, 2 threads, one padded batch per request) on the two
# encoder rerankers people serve on CPUs, full-size configs with random weights:
#   minilm    cross-encoder/ms-marco-MiniLM-L-6-v2 (BERT, hidden 384, 6 layers)
#   bge-base  BAAI/bge-reranker-base (XLM-RoBERTa, hidden 768, 12 layers, vocab 250002)
# Per model, in one run, alternating the two sides ROUNDS times so both see the same load:
#   batch32  pairs/s on requests of 32 documents (60–268 tokens) at 1 caller: our engine gets
#            the 32 pairs as one request, PyTorch scores them as one batch of 32;
#   seed15   p50 latency of a seed-shaped request (15 documents of 60–268 tokens) at 1 caller.
# Both sides generate the same requests (the SplitMix64 stream of `rerank bench`), and a scores
# check compares `rerank score` with PyTorch on the first batch32 request (max |Δ|).
# Not part of `make test`.
#
# Needs: a release binary (cargo build --release) and a Python with torch, transformers, tokenizers
# and safetensors (default .tools/torch-venv, else .tools/golden-venv; set PY otherwise).
# Writes JSON lines and a summary to $OUT (default bench/out); commit them under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
BIN=${BIN:-target/release/rerank}
PY=${PY:-$(for py in .tools/torch-venv/bin/python .tools/golden-venv/bin/python; do
  [[ -x $py ]] && echo "$py" && break; done)}
[[ -n $PY ]] || { echo "no Python with torch: set PY (see bench/README.md)" >&2; exit 1; }
MODELS=${MODELS:-minilm bge-base}
ROUNDS=${ROUNDS:-2}
# Measured and warm-up requests per run, per model ("batch32 seed15"): bge-base costs ~8x minilm.
REQUESTS_minilm=${REQUESTS_minilm:-"4 6"}
REQUESTS_bge_base=${REQUESTS_bge_base:-"2 3"}
WARMUP_minilm=${WARMUP_minilm:-1}
WARMUP_bge_base=${WARMUP_bge_base:-0}
MACHINE=${MACHINE:-$(nproc)cpu-$(lscpu | sed -n 's/^Model name: *//p' | tr -c 'A-Za-z0-9\n' '_' | tr -s '_')}
RESULT=$OUT/encoders.$MACHINE.jsonl
mkdir -p "$OUT"
: > "$RESULT"

# Workload flags per case, shared by both sides.
declare -A SHAPE=([batch32]="--documents 32 --min-tokens 60 --max-tokens 268"
                  [seed15]="--documents 15 --min-tokens 60 --max-tokens 268")
tag() { sed "s/^{/{\"model\":\"$1\",\"case\":\"$2\",\"round\":$3,/" | tee -a "$RESULT"; }

for model in $MODELS; do
  dir=$OUT/$model
  [[ -f $dir/model.safetensors ]] || "$PY" bench/torch_cpu_baseline.py export-encoder "$model" "$dir"
  var=${model//-/_}
  requests=REQUESTS_$var warmup=WARMUP_$var
  read -r n_batch32 n_seed15 <<< "${!requests}"
  declare -A COUNT=([batch32]=$n_batch32 [seed15]=$n_seed15)
  for round in $(seq "$ROUNDS"); do
    for case in batch32 seed15; do
      # shellcheck disable=SC2086 # SHAPE holds several flags
      "$BIN" bench --model "$dir" --device cpu --workload custom ${SHAPE[$case]} --concurrency 1 \
        --requests "${COUNT[$case]}" --warmup-requests "${!warmup}" | tag "$model" "$case" "$round"
      scores=()
      [[ $round == 1 && $case == batch32 ]] && scores=(--scores-out "$OUT/$model.torch_scores.jsonl" --check-requests 1)
      # shellcheck disable=SC2086
      "$PY" bench/torch_cpu_baseline.py bench "$dir" ${SHAPE[$case]} --concurrency 1 \
        --requests "${COUNT[$case]}" --warmup-requests "${!warmup}" "${scores[@]}" | tag "$model" "$case" "$round"
    done
  done
  # Exactness on the benchmark's own pairs: `rerank score` vs PyTorch (max |Δ|, and the scores'
  # scale so the difference can be read).
  python3 - "$BIN" "$dir" "$OUT/$model.torch_scores.jsonl" "$model" <<'PY' | tee -a "$RESULT"
import json, subprocess, sys
binary, model_dir, path, name = sys.argv[1:]
worst, scale, pairs = 0.0, 0.0, 0
for line in open(path):
    case = json.loads(line)
    out = subprocess.run([binary, "score", "--model", model_dir, "--device", "cpu"],
                         input=json.dumps({"query": case["query"], "documents": case["documents"]}),
                         capture_output=True, text=True, check=True)
    ours = json.loads(out.stdout)["scores"]
    worst = max(worst, max(abs(a - b) for a, b in zip(ours, case["scores"])))
    scale = max(scale, max(abs(b) for b in case["scores"]))
    pairs += len(ours)
print(json.dumps({"model": name, "check": "rerank_vs_torch_scores", "pairs": pairs,
                  "max_abs_diff": worst, "max_abs_score": scale}))
PY
done

# Ratios per model and round (ours / torch): pairs/s of batch32 (higher is better), p50 of seed15
# (torch / ours: higher is better, so both read "x as fast as PyTorch").
python3 - "$RESULT" <<'PY' | tee "$OUT/encoders.$MACHINE.summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runs = [r for r in rows if "round" in r]
checks = {r["model"]: r for r in rows if r.get("check")}
print("| model | round | batch32 rerank pairs/s | torch pairs/s | speed-up | seed15 rerank p50 ms | torch p50 ms | speed-up | same tokens | max abs diff (max abs score) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for model in dict.fromkeys(r["model"] for r in runs):
    for rnd in sorted({r["round"] for r in runs if r["model"] == model}):
        at = lambda case, mode: next(r for r in runs if r["model"] == model and r["round"] == rnd
                                     and r["case"] == case and r["mode"] == mode)
        b_ours, b_torch = at("batch32", "engine"), at("batch32", "torch")
        s_ours, s_torch = at("seed15", "engine"), at("seed15", "torch")
        for r in (b_ours, b_torch, s_ours, s_torch):
            assert not r.get("failed"), f"{model}: failed requests"
        same = all(o["real_tokens"] == t["real_tokens"] and o["pairs"] == t["pairs"]
                   for o, t in ((b_ours, b_torch), (s_ours, s_torch)))
        c = checks.get(model, {})
        diff = f"{c['max_abs_diff']:.1e} ({c['max_abs_score']:.1f})" if c else "–"
        print(f"| {model} | {rnd} | {b_ours['pairs_per_s']:.2f} | {b_torch['pairs_per_s']:.2f} | "
              f"{b_ours['pairs_per_s'] / b_torch['pairs_per_s']:.2f}x | {s_ours['latency_ms']['p50']:.0f} | "
              f"{s_torch['latency_ms']['p50']:.0f} | {s_torch['latency_ms']['p50'] / s_ours['latency_ms']['p50']:.2f}x | "
              f"{'yes' if same else 'NO'} | {diff} |")
PY
