"""PyTorch CPU baseline for `rerank bench` on the same model and the same requests.

Three commands:

* ``export DIR --tokenizer tokenizer.json``: writes a random llama_bidirec checkpoint in Hugging Face
  layout (config.json, model.safetensors, tokenizer.json) that `rerank bench --model DIR` loads. The
  default size is the issue-15 mid-size model: hidden 384, 6 layers, 6 heads / 2 KV heads,
  intermediate 1536, the real Llama 3.2 vocabulary.
* ``bench DIR``: the seed-style service's hot path on that checkpoint, per request: tokenize the 15
  pairs with the fast tokenizer, pad to the longest, run transformers' eager Llama layers in fp32
  with a padding-only (bidirectional) mask on ``--threads`` intra-op threads, masked mean pooling,
  score head / temperature. ``--concurrency`` caller threads share one model behind a lock (one
  forward at a time, as one uvicorn worker with one model serves them). The requests are generated
  exactly as `rerank bench --workload seed` generates them (same SplitMix64 stream, same words), so
  both sides score the same pairs. Prints one JSON line, shaped like `rerank bench`'s.

* ``serve DIR --port P``: the seed-style service itself: one FastAPI + uvicorn process on 127.0.0.1
  answering the seed API (``POST /rerank`` ``{"query", "documents"}`` -> ``{"scores",
  "ranked_indices"}``, ``GET /health``) with the same hot path as ``bench`` (the ``HotPath`` class:
  requests are tokenized on uvicorn's thread pool, one forward at a time behind the lock).
  `rerank bench --mode http --url http://127.0.0.1:P` drives it (bench/cpu.sh does).

``--scores-out FILE`` writes the scores of the first ``--check-requests`` measured requests, so a
caller can compare them with `rerank score` (bench/cpu.sh does).
"""
import argparse
import json
import os
import shutil
import threading
import time

MID = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
           num_key_value_heads=2, head_dim=64)

WORDS = ["the", "of", "and", "to", "in", "is", "for", "that", "with", "on", "as", "by", "this",
         "from", "at", "are", "was", "be", "or", "an", "it", "not", "which", "have"]
MASK64 = (1 << 64) - 1


class SplitMix:
    """The generator of src/cli/bench.rs, bit for bit."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def range(self, lo, hi):
        return lo + self.next() % (max(hi - lo, 0) + 1)


def workload(count, seed=42, documents=15, min_tokens=60, max_tokens=268):
    rng = SplitMix(seed)
    requests = []
    for r in range(count):
        docs = []
        for _ in range(documents):
            words = max(rng.range(min_tokens, max_tokens) - 12, 1)
            docs.append(" ".join(WORDS[rng.next() % len(WORDS)] for _ in range(words)))
        requests.append((f"benchmark query number {r}", docs))
    return requests


def config_json(args):
    return {
        "architectures": ["LlamaBidirectionalForSequenceClassification"],
        "model_type": "llama_bidirec", "pooling": "avg", "temperature": 0.2,
        "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": 128001,
    }


def build(cfg, threads):
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.set_num_threads(threads)
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "pad_token_id"]
    lcfg = LlamaConfig(**{k: cfg[k] for k in keys})
    lcfg._attn_implementation = "eager"

    class Reranker(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = LlamaModel(lcfg)
            self.score = torch.nn.Linear(lcfg.hidden_size, 1, bias=False)
            self.temperature = cfg["temperature"]
            for layer in self.model.layers:
                layer.self_attn.is_causal = False

        @torch.inference_mode()
        def forward(self, ids, mask):
            m = self.model
            h = m.embed_tokens(ids)
            t = ids.shape[1]
            pos = torch.arange(t).unsqueeze(0).expand(ids.shape[0], -1)
            add = torch.zeros(mask.shape, dtype=h.dtype)
            add = add.masked_fill(mask == 0, torch.finfo(h.dtype).min)[:, None, None, :]
            add = add.expand(-1, 1, t, t)
            pe = m.rotary_emb(h, pos)
            for layer in m.layers:
                out = layer(h, attention_mask=add, position_ids=pos, position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
            h = m.norm(h)
            mf = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mf).sum(1) / mf.sum(1)
            return (self.score(pooled) / self.temperature).squeeze(-1)

    return Reranker().eval()


def export(args):
    import torch
    from safetensors.torch import save_file

    os.makedirs(args.dir, exist_ok=True)
    cfg = config_json(args)
    torch.manual_seed(args.seed)
    model = build(cfg, 1)
    with torch.no_grad():
        # Norm weights away from 1 so a wrong norm shows in the scores.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        model.score.weight.normal_(0.0, 1.0)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary" not in k}
    save_file(tensors, os.path.join(args.dir, "model.safetensors"))
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shutil.copy(args.tokenizer, os.path.join(args.dir, "tokenizer.json"))
    print(json.dumps({"exported": args.dir, "params": sum(t.numel() for t in tensors.values())}))


def percentile(sorted_samples, q):
    if not sorted_samples:
        return 0.0
    i = round((len(sorted_samples) - 1) * q)
    return sorted_samples[min(i, len(sorted_samples) - 1)]


class HotPath:
    """The seed service's work for one request, shared by ``bench`` and ``serve``: tokenize the
    pairs, pad to the longest, one fp32 eager forward at a time (the lock), pooled score / T."""

    def __init__(self, model_dir, threads, max_length):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.torch = torch
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.model = build(cfg, threads)
        self.model.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors")),
                                   strict=False)
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=cfg["pad_token_id"], direction="right")
        self.lock = threading.Lock()

    def __call__(self, query, docs):
        """(scores, real tokens, padded tokens) of one request."""
        if not docs:
            return [], 0, 0
        torch = self.torch
        encodings = self.tok.encode_batch([f"question:{query} \n \n passage:{d}" for d in docs])
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        with self.lock:
            scores = self.model(ids, mask)
        return scores.tolist(), int(mask.sum()), int(mask.numel())


def bench(args):
    import torch

    handle = HotPath(args.dir, args.threads, args.max_length)
    everything = workload(args.warmup_requests + args.requests, seed=args.seed)
    warmup, measured = everything[:args.warmup_requests], everything[args.warmup_requests:]

    def run(requests):
        results = [None] * len(requests)
        cursor = iter(range(len(requests)))
        cursor_lock = threading.Lock()

        def caller():
            while True:
                with cursor_lock:
                    i = next(cursor, None)
                if i is None:
                    return
                t = time.perf_counter()
                scores, real, padded = handle(*requests[i])
                results[i] = (time.perf_counter() - t, scores, real, padded)

        threads = [threading.Thread(target=caller) for _ in range(max(args.concurrency, 1))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, time.perf_counter() - started

    run(warmup)
    results, seconds = run(measured)
    latencies = sorted(r[0] * 1e3 for r in results)
    pairs = sum(len(r[1]) for r in results)
    real = sum(r[2] for r in results)
    padded = sum(r[3] for r in results)
    report = dict(
        mode="torch", workload="seed", device="cpu", dtype="f32", torch=torch.__version__,
        threads=args.threads, concurrency=args.concurrency, requests=len(results), pairs=pairs,
        real_tokens=real, seconds=seconds, requests_per_s=len(results) / seconds,
        pairs_per_s=pairs / seconds, real_tokens_per_s=real / seconds,
        latency_ms=dict(p50=percentile(latencies, 0.5), p90=percentile(latencies, 0.9),
                        p99=percentile(latencies, 0.99), max=latencies[-1]),
        padding_overhead=padded / max(real, 1) - 1.0)
    print(json.dumps(report), flush=True)
    if args.scores_out:
        with open(args.scores_out, "w") as f:
            for (query, docs), r in zip(measured[:args.check_requests], results):
                f.write(json.dumps({"query": query, "documents": docs, "scores": r[1]}) + "\n")


def serve(args):
    """The seed API on 127.0.0.1:PORT; a sync route, so uvicorn runs requests on its thread pool
    and ``HotPath``'s lock keeps one forward at a time."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    handle = HotPath(args.dir, args.threads, args.max_length)
    app = FastAPI()

    class RerankBody(BaseModel):
        query: str
        documents: list[str]

    @app.post("/rerank")
    def rerank(body: RerankBody):
        scores = handle(body.query, body.documents)[0]
        # Descending score, ties by ascending index (sorted is stable).
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return {"scores": scores, "ranked_indices": ranked}

    @app.get("/health")
    def health():
        return {"status": "healthy", "model_loaded": True, "device": "cpu"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1, log_level="warning")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("dir")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--hidden", type=int, default=MID["hidden_size"])
    e.add_argument("--intermediate", type=int, default=MID["intermediate_size"])
    e.add_argument("--layers", type=int, default=MID["num_hidden_layers"])
    e.add_argument("--heads", type=int, default=MID["num_attention_heads"])
    e.add_argument("--kv-heads", type=int, default=MID["num_key_value_heads"])
    b = sub.add_parser("bench")
    b.add_argument("dir")
    b.add_argument("--concurrency", type=int, default=1)
    b.add_argument("--requests", type=int, default=40)
    b.add_argument("--warmup-requests", type=int, default=2)
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--max-length", type=int, default=512)
    b.add_argument("--scores-out")
    b.add_argument("--check-requests", type=int, default=4)
    s = sub.add_parser("serve")
    s.add_argument("dir")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--max-length", type=int, default=512)
    args = p.parse_args()
    dict(export=export, bench=bench, serve=serve)[args.command](args)


if __name__ == "__main__":
    main()
