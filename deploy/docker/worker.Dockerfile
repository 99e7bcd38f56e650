# syntax=docker/dockerfile:1
# Tandem GPU worker image: CUDA 13 runtime + cuDNN 9 base, onnxruntime-gpu (CUDA 13 build).
#
# Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t tandem-worker:0.1.0 .
#
# The CUDA base must match onnxruntime-gpu's CUDA major version (1.31: CUDA 13, cuDNN 9), and the node's
# NVIDIA driver must support that CUDA version. Pin the base by digest in your registry mirror:
#   docker buildx imagetools inspect nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment with the project, [gpu] extra ---------------------------------------
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH
ARG ORT_GPU_VERSION=1.31.1
WORKDIR /src
COPY . .
# `trees` adds XGBoost and LightGBM (MLflow-flavour models, docs/models.md). `gpu` adds onnxruntime-gpu,
# but pip also installs the CPU `onnxruntime` of the base requirements (an `extra != 'gpu'` marker does
# not exclude it), and both write the same `onnxruntime` package.
# Remove both and reinstall only the GPU build, then fail the build if CUDA is not offered.
RUN pip install ".[gpu,trees]" \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()" \
    && tandem --help > /dev/null

# ---- runtime: the venv on the same CUDA base, non-root ------------------------------------------------
FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="tandem-worker" \
      org.opencontainers.image.description="Tandem ML worker (ZeroMQ, adaptive batching, ONNX Runtime CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tandem
COPY --from=build /opt/tandem /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 10001:10001
# 5555: ZeroMQ (TANDEM_BIND); 9100: /metrics, /healthz, /readyz (TANDEM_METRICS_PORT).
EXPOSE 5555 9100
ENTRYPOINT ["tandem"]
CMD ["worker"]
