#!/usr/bin/env bash
# Regenerate the image lock files, images/locks/*.txt: every package each image installs, pinned with its
# hashes, for linux x86_64. Run from anywhere after changing pyproject.toml's dependencies:
#   images/lock.sh            (needs uv on PATH, or UV=/path/to/uv)
# The Dockerfiles install a lock with `pip install --require-hashes` and then tessera itself with --no-deps,
# so an image built from another checkout, or next month, holds the same packages; the lock is one of the
# files its content tag hashes.
#
# What no lock can cover: the Gaudi image's venv is made with --system-site-packages over Intel's SynapseAI
# PyTorch image, and its lock pins numpy, onnx, protobuf and the rest from PyPI without knowing what that
# image already holds (its `pip freeze` cannot be read without pulling the image, and Intel's support
# matrix publishes only the framework versions: torch 2.6.0, Python 3.12 on Ubuntu 24.04). A venv package
# shadows the image's copy of the same name, so torch and habana_frameworks then import this lock's numpy:
# an extension built against another numpy ABI fails at import, on the DL1, not here. After changing the
# Gaudi lock or the base image, check on a DL1 (or from `docker run` of the built image):
#   python -c "import numpy, torch, habana_frameworks.torch.core; print(numpy.__version__)"; pip check
# and, when the image's numpy proves to be needed, pin it in locks/trainer-gaudi.overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
locks=images/locks
# glibc of the images' bases: Ubuntu 24.04 and Debian 12 (2.36+) take manylinux_2_28 wheels; the Lambda
# base of the database bootstrap is Amazon Linux 2 (glibc 2.26), so it needs manylinux2014 (2.17) ones.
glibc_2_28=x86_64-manylinux_2_28
amazon_linux_2=x86_64-manylinux_2_17

compile() {  # compile OUTPUT PYTHON_VERSION PLATFORM INPUT [uv pip compile options...]
  local out=$1 python=$2 platform=$3 input=$4
  shift 4
  "$uv" pip compile "$input" "$@" \
    --python-platform "$platform" --python-version "$python" \
    --generate-hashes --no-strip-extras --quiet \
    --custom-compile-command "images/lock.sh" --output-file "$locks/$out"
}

# model-runner, sky-generator, fits-classifier, sight-catalog: the runtime dependencies only.
compile services.txt 3.11 "$glibc_2_28" pyproject.toml
# Trainer for Turing, Ampere and newer NVIDIA GPUs (g4dn, g5, g6, p4d, p5, ...): PyPI's torch (CUDA 13).
compile trainer-cuda13.txt 3.11 "$glibc_2_28" pyproject.toml --extra train
# Trainer for Volta (p3, p3dn): CUDA 13 dropped sm_70; the last PyPI torch built with it (CUDA 12.8).
compile trainer-cuda12.txt 3.11 "$glibc_2_28" pyproject.toml --extra train \
  --override "$locks/trainer-cuda12.overrides"
# Trainer for Gaudi (dl1): torch and the Habana bridge come with the SynapseAI base image (Python 3.12); see
# the note at the top on the packages that image already holds.
compile trainer-gaudi.txt 3.12 "$glibc_2_28" pyproject.toml --extra train \
  --override "$locks/trainer-gaudi.overrides"
# Database bootstrap (Lambda, Python 3.11 on Amazon Linux 2): only what services/cloud/database_roles.py
# imports (locks/db-bootstrap.in), at the versions the services lock holds.
compile db-bootstrap.txt 3.11 "$amazon_linux_2" "$locks/db-bootstrap.in" --constraint "$locks/services.txt"
