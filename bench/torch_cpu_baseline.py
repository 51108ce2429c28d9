"""PyTorch CPU baseline for `rerank bench` on the same model and the same requests.

Four commands:

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

* ``export-encoder {minilm,bge-base} DIR``: writes a random full-size encoder cross-encoder in
  Hugging Face layout (``save_pretrained``: config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json, special_tokens_map.json): ``minilm`` is cross-encoder/ms-marco-MiniLM-L-6-v2's
  config (BertForSequenceClassification, hidden 384, 6 layers, 12 heads, intermediate 1536, vocab
  30522), ``bge-base`` is BAAI/bge-reranker-base's (XLMRobertaForSequenceClassification, hidden 768,
  12 layers, 12 heads, intermediate 3072, vocab 250002). No real tokenizer can be downloaded, so one
  is trained with the family's pipeline (tests/fixtures/make_golden_families.py's trainers: BERT
  WordPiece uncased ``[CLS] $A [SEP] $B:1 [SEP]:1``, XLM-R Unigram/Metaspace
  ``<s> $A </s> </s> $B </s>``) on the benchmark's own words and the fixtures' corpus; its vocabulary
  is smaller than the config's, which only changes which embedding rows are read.

``bench`` and ``serve`` pick the hot path from the checkpoint's ``model_type``: ``llama_bidirec`` gets
the seed service's (above); any other model gets sentence-transformers' CrossEncoder's
(``CrossEncoderHotPath``: ``AutoTokenizer`` + ``AutoModelForSequenceClassification`` fp32, the
request's pairs as one batch ``tokenizer(queries, docs, truncation=True, max_length=512,
padding=True)``, ``logits[:, 0]``). ``--documents/--min-tokens/--max-tokens`` shape the requests as
`rerank bench --workload custom` does (default: the seed shape).

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

# Full-size configs of the two encoder rerankers people serve on CPUs (random weights).
ENCODERS = {
    "minilm": ("bert", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, vocab_size=30522, max_position_embeddings=512,
                            type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)),
    "bge-base": ("xlm-roberta", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=250002,
                                     max_position_embeddings=514, type_vocab_size=1,
                                     layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2)),
}

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


def whole_word_pieces(tok, words):
    """Adds ``▁word`` pieces to a trained Unigram tokenizer. On a corpus this small the trainer keeps
    only ~300 short pieces, so English words would split into 3–6 tokens; XLM-R's real 250k
    SentencePiece vocabulary has common words whole, and so the benchmark's token counts match."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    have = {piece for piece, _ in spec["model"]["vocab"]}
    spec["model"]["vocab"] += [["\u2581" + w, -2.0] for w in words if "\u2581" + w not in have]
    return Tokenizer.from_str(json.dumps(spec))


def export_encoder(args):
    """A random full-size encoder cross-encoder plus a trained tokenizer of its family."""
    import sys

    import torch
    from transformers import (BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast,
                              XLMRobertaConfig, XLMRobertaForSequenceClassification)

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "fixtures"))
    import make_golden_families as fam

    family, shape = ENCODERS[args.name]
    # The benchmark's words and queries plus the fixtures' multilingual corpus: every benchmark
    # word is one token, as in the real vocabularies.
    words = WORDS + "benchmark query number".split()
    corpus = fam.CORPUS + [" ".join(WORDS)] * 20 + [f"benchmark query number {i}" for i in range(100)]
    torch.manual_seed(args.seed)
    if family == "bert":
        raw = fam.train_bert_tokenizer(corpus, shape["vocab_size"])
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", sep_token="[SEP]",
                                      pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                      model_max_length=512)
        model = BertForSequenceClassification(BertConfig(num_labels=1, hidden_act="gelu", **shape))
        head = model.classifier
    else:
        raw = whole_word_pieces(fam.train_xlmr_tokenizer(corpus, shape["vocab_size"]), words)
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", sep_token="</s>", pad_token="<pad>",
                                      cls_token="<s>", mask_token="<mask>", model_max_length=512)
        model = XLMRobertaForSequenceClassification(
            XLMRobertaConfig(num_labels=1, hidden_act="gelu", **shape))
        head = model.classifier.out_proj
    assert raw.token_to_id(tok.pad_token) == shape["pad_token_id"]
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)  # scores spread over units, so |Δ| has a scale
    model.eval()
    model.save_pretrained(args.dir, safe_serialization=True)
    tok.save_pretrained(args.dir)
    print(json.dumps({"exported": args.dir, "family": family, "tokenizer_vocab": raw.get_vocab_size(),
                      "params": sum(p.numel() for p in model.parameters())}))


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


class CrossEncoderHotPath:
    """sentence-transformers' CrossEncoder.predict for one request: the pairs as one batch through
    the checkpoint's own tokenizer (truncation, padded to the longest), one fp32 forward of
    ``AutoModelForSequenceClassification`` (transformers' default attention) under ``no_grad``,
    ``logits[:, 0]`` (raw, no activation). The lock keeps one forward at a time."""

    def __init__(self, model_dir, threads, max_length):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, torch_dtype=torch.float32).eval()
        self.attention = self.model.config._attn_implementation
        self.max_length = max_length
        self.lock = threading.Lock()

    def __call__(self, query, docs):
        """(scores, real tokens, padded tokens) of one request."""
        if not docs:
            return [], 0, 0
        enc = self.tok([query] * len(docs), docs, truncation=True, max_length=self.max_length,
                       padding=True, return_tensors="pt")
        with self.lock, self.torch.no_grad():
            logits = self.model(**enc).logits
        mask = enc["attention_mask"]
        return logits[:, 0].tolist(), int(mask.sum()), int(mask.numel())


def hot_path(model_dir, threads, max_length):
    """The seed service's hot path for llama_bidirec, CrossEncoder's for any other family."""
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    kind = HotPath if model_type == "llama_bidirec" else CrossEncoderHotPath
    return kind(model_dir, threads, max_length)


def bench(args):
    import torch

    handle = hot_path(args.dir, args.threads, args.max_length)
    everything = workload(args.warmup_requests + args.requests, seed=args.seed,
                          documents=args.documents, min_tokens=args.min_tokens,
                          max_tokens=args.max_tokens)
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
    seed_shape = (args.documents, args.min_tokens, args.max_tokens) == (15, 60, 268)
    report = dict(
        mode="torch", workload="seed" if seed_shape else "custom", device="cpu", dtype="f32",
        torch=torch.__version__, hot_path=type(handle).__name__,
        attention=getattr(handle, "attention", "eager"), documents=args.documents,
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

    handle = hot_path(args.dir, args.threads, args.max_length)
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
    x = sub.add_parser("export-encoder")
    x.add_argument("name", choices=sorted(ENCODERS))
    x.add_argument("dir")
    x.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench")
    b.add_argument("dir")
    b.add_argument("--concurrency", type=int, default=1)
    b.add_argument("--requests", type=int, default=40)
    b.add_argument("--warmup-requests", type=int, default=2)
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--max-length", type=int, default=512)
    b.add_argument("--documents", type=int, default=15)
    b.add_argument("--min-tokens", type=int, default=60)
    b.add_argument("--max-tokens", type=int, default=268)
    b.add_argument("--scores-out")
    b.add_argument("--check-requests", type=int, default=4)
    s = sub.add_parser("serve")
    s.add_argument("dir")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--max-length", type=int, default=512)
    args = p.parse_args()
    commands = {"export": export, "export-encoder": export_encoder, "bench": bench, "serve": serve}
    commands[args.command](args)


if __name__ == "__main__":
    main()
