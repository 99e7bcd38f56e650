# syntax=docker/dockerfile:1
# MLflow tracking/registry server for Tandem: PostgreSQL backend (psycopg2), proxied artifacts.
#
# Build from the repository root (the context is not used beyond this file):
#   docker build -f deploy/docker/mlflow.Dockerfile -t tandem-mlflow:3.18.0 .
#
# Keep MLFLOW_VERSION at or above the mlflow client version in the app/worker images.
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
ARG MLFLOW_VERSION=3.18.0
ARG PSYCOPG2_VERSION=2.9.13
RUN python -m venv /opt/mlflow \
    && /opt/mlflow/bin/pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" \
    && /opt/mlflow/bin/mlflow --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tandem-mlflow" \
      org.opencontainers.image.description="MLflow server with PostgreSQL support, for Tandem" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin mlflow
COPY --from=build /opt/mlflow /opt/mlflow
ENV PATH=/opt/mlflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
WORKDIR /tmp
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1"]
