#!/usr/bin/env bash
# Regenerate the image lock files, images/locks/*.txt: every package each image installs, pinned with its
# hashes, for linux x86_64 (manylinux_2_28). Run from anywhere after changing pyproject.toml's dependencies:
#   images/lock.sh            (needs uv on PATH, or UV=/path/to/uv)
# The Dockerfiles install a lock with `pip install --require-hashes` and then tessera itself with --no-deps,
# so an image built from another checkout, or next month, holds the same packages; the lock is one of the
# files its content tag hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
locks=images/locks

compile() {  # compile OUTPUT PYTHON_VERSION [uv pip compile options...]
  local out=$1 python=$2
  shift 2
  "$uv" pip compile pyproject.toml "$@" \
    --python-platform x86_64-manylinux_2_28 --python-version "$python" \
    --generate-hashes --no-strip-extras --quiet \
    --custom-compile-command "images/lock.sh" --output-file "$locks/$out"
}

# model-runner, sky-generator, fits-classifier, sight-catalog: the runtime dependencies only.
compile services.txt 3.11
# Trainer for Turing, Ampere and newer NVIDIA GPUs (g4dn, g5, g6, p4d, p5, ...): PyPI's torch (CUDA 13).
compile trainer-cuda13.txt 3.11 --extra train
# Trainer for Volta (p3, p3dn): CUDA 13 dropped sm_70; the last PyPI torch built with it (CUDA 12.8).
compile trainer-cuda12.txt 3.11 --extra train --override "$locks/trainer-cuda12.overrides"
# Trainer for Gaudi (dl1): torch and the Habana bridge come with the SynapseAI base image (Python 3.12).
compile trainer-gaudi.txt 3.12 --extra train --override "$locks/trainer-gaudi.overrides"
