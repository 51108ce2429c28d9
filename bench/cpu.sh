#!/usr/bin/env bash
# CPU benchmark (issue 15): `rerank bench --mode engine` against the seed-style PyTorch service
# (bench/torch_cpu_baseline.py: transformers fp32 eager, 2 threads, each request padded to its
# longest pair) on the same random mid-size model (hidden 384, 6 layers, 6/2 heads, intermediate
# 1536, real Llama 3.2 tokenizer) and the same seed-shaped requests, in one run, alternating the
# two sides so both see the same machine load. Then the same end to end over HTTP: `rerank serve`
# (worker + sidecar + its own nats-server) against `torch_cpu_baseline.py serve` (FastAPI +
# uvicorn), both on 127.0.0.1, driven by `rerank bench --mode http`. Not part of `make test`.
#
# Needs: a release binary (cargo build --release), the tokenizer and nats-server (make setup) and a
# Python venv with torch, transformers, safetensors, fastapi and uvicorn (default
# .tools/torch-venv, else the golden venv `make golden` builds, .tools/golden-venv, plus fastapi and
# uvicorn; set PY otherwise; see bench/README.md).
# Writes JSON lines and a summary to $OUT (default bench/out); commit them under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
BIN=${BIN:-target/release/rerank}
PY=${PY:-$(for py in .tools/torch-venv/bin/python .tools/golden-venv/bin/python; do
  [[ -x $py ]] && echo "$py" && break; done)}
[[ -n $PY ]] || { echo "no Python with torch: set PY (see bench/README.md)" >&2; exit 1; }
REQUESTS=${REQUESTS:-40}
WARMUP=${WARMUP:-2}   # unmeasured requests before each run
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
      --requests "$REQUESTS" --warmup-requests "$WARMUP" | sed "s/^{/{\"round\":$round,/" | tee -a "$RESULT"
    "$PY" bench/torch_cpu_baseline.py bench "$MODEL" --concurrency "$c" --requests "$REQUESTS" \
      --warmup-requests "$WARMUP" | sed "s/^{/{\"round\":$round,/" | tee -a "$RESULT"
  done
done

# 3. End to end over HTTP: both services on loopback, each driven by `rerank bench --mode http`.
export PATH="$PWD/.tools/nats/bin:$PATH"   # `rerank serve` starts its nats-server from PATH
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
RERANK_PORT=$(free_port) TORCH_PORT=$(free_port) NATS_PORT=$(free_port)
SERVERS=()
stop_servers() {
  for pid in "${SERVERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${SERVERS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT
"$BIN" serve --model "$MODEL" --device cpu --listen "127.0.0.1:$RERANK_PORT" \
  --nats-url "nats://127.0.0.1:$NATS_PORT" > "$OUT/serve.rerank.log" 2>&1 &
SERVERS+=($!)
"$PY" bench/torch_cpu_baseline.py serve "$MODEL" --port "$TORCH_PORT" > "$OUT/serve.torch.log" 2>&1 &
SERVERS+=($!)
# Ready = GET /health answers 200 (ours: a worker with its model loaded and warmed up).
wait_healthy() { # PID PORT LOG
  local deadline=$((SECONDS + 600))
  until curl -sf --max-time 2 "http://127.0.0.1:$2/health" > /dev/null; do
    kill -0 "$1" 2>/dev/null || { echo "server on port $2 exited; see $3" >&2; exit 1; }
    ((SECONDS < deadline)) || { echo "server on port $2 not healthy in 600 s; see $3" >&2; exit 1; }
    sleep 0.5   # poll interval, not a readiness guess
  done
}
wait_healthy "${SERVERS[0]}" "$RERANK_PORT" "$OUT/serve.rerank.log"
wait_healthy "${SERVERS[1]}" "$TORCH_PORT" "$OUT/serve.torch.log"
for round in $(seq "$ROUNDS"); do
  for c in 1 8; do
    for side in rerank torch; do
      port=$([[ $side == rerank ]] && echo "$RERANK_PORT" || echo "$TORCH_PORT")
      "$BIN" bench --mode http --url "http://127.0.0.1:$port" --workload seed --concurrency "$c" \
        --requests "$REQUESTS" --warmup-requests "$WARMUP" | sed "s/^{/{\"round\":$round,\"service\":\"$side\",/" | tee -a "$RESULT"
    done
  done
done
stop_servers
trap - EXIT

# 4. Ratios per round (ours / torch): pairs/s at 8 callers, p50 at 1 caller; in-process engine
# rows (rerank's engine vs the torch hot path) and HTTP rows (both services end to end).
python3 - "$RESULT" <<'PY' | tee "$OUT/cpu.$MACHINE.summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"round"' in l]
sides = {"engine": (lambda x: x["mode"] == "engine", lambda x: x["mode"] == "torch"),
         "http": (lambda x: x.get("service") == "rerank", lambda x: x.get("service") == "torch")}
padding = lambda x: "–" if x.get("padding_overhead") is None else f"{x['padding_overhead']:.2f}"
print("| path | round | callers | rerank pairs/s | torch pairs/s | ratio | rerank p50 ms | torch p50 ms | p50 ratio | rerank padding | torch padding |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for path, (is_ours, is_theirs) in sides.items():
    for r in sorted({x["round"] for x in rows}):
        for c in (1, 8):
            at = lambda pick: next(x for x in rows if x["round"] == r and x["concurrency"] == c and pick(x))
            ours, theirs = at(is_ours), at(is_theirs)
            # Over HTTP neither reply carries token usage (both report 0): the pairs must match.
            assert ours["real_tokens"] == theirs["real_tokens"], "the two sides scored different tokens"
            assert ours["pairs"] == theirs["pairs"], f"{path}: the two sides scored different pairs"
            assert not ours.get("failed") and not theirs.get("failed"), f"{path}: failed requests"
            print(f"| {path} | {r} | {c} | {ours['pairs_per_s']:.1f} | {theirs['pairs_per_s']:.1f} | "
                  f"{ours['pairs_per_s'] / theirs['pairs_per_s']:.2f}x | {ours['latency_ms']['p50']:.0f} | "
                  f"{theirs['latency_ms']['p50']:.0f} | {ours['latency_ms']['p50'] / theirs['latency_ms']['p50']:.2f} | "
                  f"{padding(ours)} | {padding(theirs)} |")
PY
