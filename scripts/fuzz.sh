#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 5) with libFuzzer, built the way cargo-fuzz 0.13
# builds them (sanitizer coverage and AddressSanitizer; the stable toolchain through
# RUSTC_BOOTSTRAP), without installing cargo-fuzz: compiling it cost the 2-core CI box minutes.
# A crash leaves its input under fuzz/artifacts/TARGET/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-5}
host=$(rustc -vV | sed -n 's/^host: //p')
export RUSTC_BOOTSTRAP=1
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the sanitizer flags off build scripts and proc macros.
cargo build --quiet --release --target "$host" --bins
for target in decode_request parse_json_request; do
  mkdir -p "corpus/$target" "artifacts/$target"
  "target/$host/release/$target" -max_total_time="$seconds" -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$target/" "corpus/$target" 2>&1 | tail -1
done
