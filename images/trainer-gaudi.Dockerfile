# syntax=docker/dockerfile:1
# tessera trainer for Intel Gaudi (dl1: first-generation Gaudi). PyPI's torch has no Habana bridge and would
# train on the CPU, so this image starts from Intel's SynapseAI PyTorch image, whose torch 2.6 carries
# habana_frameworks.torch. SynapseAI 1.21 is the last release that supports first-generation Gaudi (1.22 lists
# Gaudi 2 and 3 only); its Ubuntu 24.04 image has Python 3.12, which images/locks/trainer-gaudi.txt is
# compiled for. The host's Habana driver must be a 1.21 one. Built by the Pulumi program (infra/registry.py)
# with the repository root as context:
#   docker build -f images/trainer-gaudi.Dockerfile --platform linux/amd64 .

FROM ghcr.io/astral-sh/uv:0.13.0 AS uv

# One stage: the venv sees the base image's torch (system site packages), so it cannot move to another base.
FROM vault.habana.ai/gaudi-docker/1.21.3/ubuntu24.04/habanalabs/pytorch-installer-2.6.0:1.21.3-57
LABEL org.opencontainers.image.title="tessera-trainer" \
      org.opencontainers.image.description="tessera trainer: model training and ONNX export (Gaudi, SynapseAI 1.21)" \
      org.opencontainers.image.vendor="tessera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="vault.habana.ai/gaudi-docker/1.21.3/ubuntu24.04/habanalabs/pytorch-installer-2.6.0:1.21.3-57"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=uv /uv /usr/local/bin/uv
# The image's own Python 3.12 and its site packages (torch, habana_frameworks), plus tessera's locked packages.
RUN uv venv --seed --system-site-packages --python /usr/bin/python3 /opt/venv
WORKDIR /src
# The locked dependencies first (images/locks/, made by images/lock.sh): every package pinned and hashed, torch
# left out (the base image's). Their layer stays cached while the code changes.
COPY images/locks/trainer-gaudi.txt requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.txt
# Then tessera alone: only what the package build reads (setuptools packages infra*, stacks* and services*).
COPY pyproject.toml README.md ./
COPY infra/ infra/
COPY stacks/ stacks/
COPY services/ services/
# --no-deps: the train extra's torch==2.13.0 must not replace the base image's Habana build.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && rm -rf /src
ENV PATH=/opt/venv/bin:$PATH
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
