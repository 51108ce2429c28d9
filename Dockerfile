# syntax=docker/dockerfile:1.7
#
# rerank-service image: one `rerank` binary for every role (worker, sidecar, download, serve, ...).
#
#   CUDA (default, last stage):  docker build -t rerank-service:0.1.0 .
#                                docker build --build-arg CUDA_COMPUTE_CAP=89 -t rerank-service:0.1.0-sm89 .
#   CPU only:                    docker build --target cpu -t rerank-service:0.1.0-cpu .
#
# The Helm chart (helm/rerank-service) runs the CUDA image on GPU workers and the -cpu image for the
# sidecar and CPU workers. Both images run as uid/gid 10001, keep the Hugging Face cache under the
# /models volume (HF_HOME=/models/hf) and work with a read-only root filesystem: only /tmp and
# /models need to be writable.

ARG UBUNTU_VERSION=24.04
ARG CUDA_VERSION=12.8.1

# ---------------------------------------------------------------------------------------------
# Rust toolchain (rustup), shared by both builders. Ubuntu 24.04, same as the CUDA devel base, so
# the toolchain can be copied into it as is.
FROM ubuntu:${UBUNTU_VERSION} AS rust
ARG RUST_VERSION=1.95.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version && cargo --version

# ---------------------------------------------------------------------------------------------
# CPU build.
FROM rust AS build-cpu
WORKDIR /src
# Cargo.toml, Cargo.lock, src/ (and build.rs, benches, ... if present): see .dockerignore.
COPY . .
RUN --mount=type=cache,id=rerank-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=rerank-target-cpu,target=/src/target,sharing=locked \
    cargo build --release --locked --bin rerank \
 && install -D -m 0755 target/release/rerank /out/rerank

# ---------------------------------------------------------------------------------------------
# CUDA build: candle's kernels are compiled by nvcc for CUDA_COMPUTE_CAP (90 = H100/H200,
# 89 = L4/L40S, 86 = A10/RTX 30xx, 80 = A100). No GPU is needed at build time.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
ARG CUDA_COMPUTE_CAP=90
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:${PATH} \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=rerank-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=rerank-target-cuda-${CUDA_COMPUTE_CAP},target=/src/target,sharing=locked \
    cargo build --release --locked --features cuda --bin rerank \
 && install -D -m 0755 target/release/rerank /out/rerank

# ---------------------------------------------------------------------------------------------
# CPU runtime: `docker build --target cpu`.
FROM ubuntu:${UBUNTU_VERSION} AS cpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="rerank-service" \
      org.opencontainers.image.description="Cross-encoder reranking over NATS (CPU build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rerank \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin rerank \
 && mkdir -p /models/hf \
 && chown -R 10001:10001 /models \
 && chmod 1777 /tmp
COPY --from=build-cpu /out/rerank /usr/local/bin/rerank
ENV HF_HOME=/models/hf \
    RERANK_DEVICE=cpu \
    RERANK_LOG_FORMAT=json \
    RUST_LOG=info
VOLUME ["/models"]
# 8001: sidecar HTTP API; 8002: worker /live, /ready, /metrics.
EXPOSE 8001 8002
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/rerank"]
CMD ["worker"]

# ---------------------------------------------------------------------------------------------
# CUDA runtime (default target). The runtime base ships cuBLAS, cuRAND and NVRTC; the driver
# (libcuda) is injected by the NVIDIA container toolkit on the GPU node.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS cuda
ARG VERSION=0.1.0
ARG CUDA_COMPUTE_CAP=90
LABEL org.opencontainers.image.title="rerank-service" \
      org.opencontainers.image.description="Cross-encoder reranking over NATS (CUDA build, sm_${CUDA_COMPUTE_CAP})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rerank \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin rerank \
 && mkdir -p /models/hf \
 && chown -R 10001:10001 /models \
 && chmod 1777 /tmp
COPY --from=build-cuda /out/rerank /usr/local/bin/rerank
ENV HF_HOME=/models/hf \
    RERANK_DEVICE=cuda \
    RERANK_LOG_FORMAT=json \
    RUST_LOG=info
VOLUME ["/models"]
EXPOSE 8001 8002
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["/usr/local/bin/rerank"]
CMD ["worker"]
