#!/usr/bin/env bash
# Builds `rerank` with --features cuda on a machine without a GPU: the CUDA 13.0 toolkit comes from
# PyPI wheels (shared/gpu/setup-cuda-pip.sh), libcuda is a link-time stub, and the binary finds the
# real libraries on the GPU machine through its rpath (build.rs). Output: target/release/rerank-cuda.xz
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${CUDA_PIP_PREFIX:-$PWD/.tools/cuda-pip}
SETUP=${CUDA_SETUP_SCRIPT:-../shared/gpu/setup-cuda-pip.sh}
cargo fetch --quiet
if [[ ! -x "$PREFIX/nvidia/cu13/bin/nvcc" ]]; then
  bash "$SETUP" "$PREFIX"
fi
export CUDA_HOME=$PREFIX/nvidia/cu13 CUDA_ROOT=$PREFIX/nvidia/cu13 CUDA_PATH=$PREFIX/nvidia/cu13
export PATH=$CUDA_HOME/bin:$PATH NVCC=$CUDA_HOME/bin/nvcc
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export LIBRARY_PATH=$CUDA_HOME/lib/stubs:$CUDA_HOME/lib:${LIBRARY_PATH:-}
cargo build --release --features cuda --bin rerank --target-dir target/cuda
strip -o target/cuda/rerank-cuda target/cuda/release/rerank
xz -T2 -9 -c target/cuda/rerank-cuda > target/cuda/rerank-cuda.xz
ls -l target/cuda/rerank-cuda target/cuda/rerank-cuda.xz
