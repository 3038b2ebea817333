# syntax=docker/dockerfile:1
# tessera sky generator: renders labelled night skies with Stellarium under a virtual X server (Mesa's
# software OpenGL: a CPU fleet, see stacks/settings.py), proves each frame's geometry, uploads the frames and
# the labels manifest. Built by the Pulumi program (infra/registry.py) with the repository root as context:
#   docker build -f images/sky-generator.Dockerfile --platform linux/amd64 .

# ---- build: a virtual environment holding tessera and its dependencies ---------------------------------
FROM python:3.11.14-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
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

# ---- runtime: the same Python, Stellarium (Debian 12: 0.22.2, what the tests render with), Xvfb, the venv --
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="tessera-sky-generator" \
      org.opencontainers.image.description="tessera sky generator: labelled Stellarium sky renders (CPU)" \
      org.opencontainers.image.vendor="tessera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"
ARG DEBIAN_FRONTEND=noninteractive
# xvfb-run (each shard starts its own Xvfb) needs xauth; libgl1-mesa-dri is Mesa's software renderer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends stellarium xvfb xauth libgl1-mesa-dri \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LIBGL_ALWAYS_SOFTWARE=1
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tessera \
       --shell /usr/sbin/nologin tessera
WORKDIR /home/tessera
USER 10001:10001
# A queue worker serves no port: a crash ends the container, Docker's restart policy starts it again and the
# SQS visibility timeout hands its shard to another worker (its lease lapses with it).
HEALTHCHECK NONE
ENTRYPOINT ["tessera"]
CMD ["worker", "sky-generator"]
