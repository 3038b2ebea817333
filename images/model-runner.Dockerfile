# syntax=docker/dockerfile:1
# tessera model runner: takes image requests and regions from SQS, runs the detector on every tile on the GPU,
# writes GeoJSON. Built by the Pulumi program (infra/registry.py) with the repository root as context:
#   docker build -f images/model-runner.Dockerfile --platform linux/amd64 .

FROM ghcr.io/astral-sh/uv:0.13.0 AS uv

# ---- build: a Python 3.11 virtual environment holding tessera and its dependencies -------------------------
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS build
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu 24.04 ships Python 3.12; uv installs a standalone CPython 3.11 (the uv version pins which one).
RUN uv python install 3.11 && uv venv --seed --python 3.11 /opt/venv
WORKDIR /src
# The locked dependencies first (images/locks/, made by images/lock.sh): every package pinned and hashed,
# so a rebuild from any checkout installs the same files. Their layer stays cached while the code changes.
COPY images/locks/services.txt requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.txt
# Then tessera alone: only what the package build reads (setuptools packages infra*, stacks* and services*).
COPY pyproject.toml README.md ./
COPY infra/ infra/
COPY stacks/ stacks/
COPY services/ services/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

# ---- runtime: CUDA + cuDNN for ONNX Runtime's CUDA provider, the venv, no sources, no build tools ----------
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
LABEL org.opencontainers.image.title="tessera-model-runner" \
      org.opencontainers.image.description="tessera model runner: tiled detection on huge rasters (GPU)" \
      org.opencontainers.image.vendor="tessera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tessera \
       --shell /usr/sbin/nologin tessera
WORKDIR /home/tessera
USER 10001:10001
# A queue worker serves no port: a crash ends the container, Docker's restart policy starts it again and the
# SQS visibility timeout hands its unfinished region to another worker.
HEALTHCHECK NONE
ENTRYPOINT ["tessera"]
CMD ["worker", "model-runner"]
