# syntax=docker/dockerfile:1
# tessera trainer: trains detector, DCGAN, FITS-classifier and sky-position models from S3 data,
# checkpoints and exports ONNX to the model registry. Built by the Pulumi program (infra/registry.py) with the
# repository root as context:
#   docker build -f images/trainer.Dockerfile --platform linux/amd64 .
# This is the trainer for NVIDIA Turing, Ampere and newer (g4dn, g5, g6, p4d, p5, ...): PyPI's torch, built for
# CUDA 13. Volta (p3) trains from trainer-cuda12.Dockerfile, Gaudi (dl1) from trainer-gaudi.Dockerfile
# (infra/trainer_images.py picks one per instance family).

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
COPY images/locks/trainer-cuda13.txt requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.txt
# Then tessera alone: only what the package build reads (setuptools packages infra*, stacks* and services*).
COPY pyproject.toml README.md ./
COPY infra/ infra/
COPY stacks/ stacks/
COPY services/ services/
# The lock holds the train extra too: PyPI's torch 2.13 (CUDA 13), onnx.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

# ---- runtime: CUDA + cuDNN, the venv, no sources, no build tools ------------------------------------------
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
LABEL org.opencontainers.image.title="tessera-trainer" \
      org.opencontainers.image.description="tessera trainer: model training and ONNX export (GPU)" \
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
# The trainer serves no port: a crash ends the container, Docker's restart policy starts it again and the
# training resumes from its last checkpoint.
HEALTHCHECK NONE
ENTRYPOINT ["tessera"]
CMD ["worker", "trainer"]
