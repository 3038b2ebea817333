# syntax=docker/dockerfile:1
# tessera sight catalog: the HTTP API over the PostgreSQL warehouse of images, labels and models (ingest,
# labelling, data-mart refresh). Built by the Pulumi program (infra/registry.py) with the repository root as
# context:
#   docker build -f images/sight-catalog.Dockerfile --platform linux/amd64 .

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

# ---- runtime: the same Python, the venv, no sources -------------------------------------------------------
FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="tessera-sight-catalog" \
      org.opencontainers.image.description="tessera sight catalog: image, label and model catalog API" \
      org.opencontainers.image.vendor="tessera" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 tessera \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/tessera \
       --shell /usr/sbin/nologin tessera
WORKDIR /home/tessera
USER 10001:10001
# The API listens on 8080 (a port a non-root user may bind) on every interface of the container, so that a
# published port reaches it, and answers GET /health. The platform runs this same command behind its load
# balancer (infra/catalog.py API_COMMAND) and the refresher, `worker sight-catalog`, with --no-healthcheck.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
ENTRYPOINT ["tessera"]
CMD ["sights", "serve", "--host", "0.0.0.0", "--port", "8080"]
