# syntax=docker/dockerfile:1
# Tandem app server image: slim, CPU only. It also runs CPU workers (overlays/cpu), since the project is
# one package and the CPU ONNX Runtime is part of it.
#
# Build from the repository root:
#   docker build -f deploy/docker/app.Dockerfile -t tandem-app:0.1.0 .
#
# Pin the base by digest in your registry mirror for reproducible builds:
#   docker buildx imagetools inspect python:3.12.12-slim-bookworm
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ---- build: a virtual environment with the project and its dependencies ----------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tandem
ENV PATH=/opt/tandem/bin:$PATH
# The CPU build of torch first, from the CPU index: the project's `torch` requirement is then already met,
# so pip never pulls the multi-gigabyte CUDA build from PyPI into this image.
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /src
COPY . .
RUN pip install . \
    && python -c "import torch; assert torch.version.cuda is None, 'a CUDA torch got into the app image'" \
    && tandem --help > /dev/null

# ---- runtime: the venv on a clean base, non-root ------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tandem-app" \
      org.opencontainers.image.description="Tandem app server (stateless HTTP tier) and CPU worker" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tandem \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tandem
COPY --from=build /opt/tandem /opt/tandem
# HOME=/tmp: libraries that write a cache under ~ find a writable place on a read-only root filesystem
# (Kubernetes mounts an emptyDir at /tmp).
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /tmp
# Numeric user, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
# 8000: app HTTP (TANDEM_PORT); 5555, 9100: ZeroMQ and metrics when it runs a CPU worker.
EXPOSE 8000 5555 9100
ENTRYPOINT ["tandem"]
CMD ["app"]
