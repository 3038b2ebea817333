#!/usr/bin/env bash
# bench/gpu.sh: the GPU checks and benchmarks of issue 14 (model runner pipeline efficiency), in one script,
# for a Linux machine with an NVIDIA GPU and NO network.
#
# NOT RUN ON A GPU YET: written on a machine without one, checked there with `bash -n`, shellcheck, and a
# run in GPU_SITE mode (QUICK=1) whose CUDA steps fail as they must there.
#
# What the machine is expected to have: Python 3.12 (or any python3 >= 3.11) with torch for CUDA 13 (whose
# nvidia-* pip wheels hold CUDA and cuDNN), the CPU build of onnxruntime, and this repository as the working
# directory. Either the packages it lacks come unpacked in a folder (GPU_SITE: bench/gpu_kit.py carries them
# there in pieces and unpacks them — the way for the GPU machines lent to this project, which hold none of
# rasterio, shapely, boto3, psycopg or SAHI), or tessera's other dependencies are installed and the CUDA
# build of ONNX Runtime comes from a local wheel file, installed with pip --no-index into a virtualenv of its
# own (the machine's packages stay visible through a .pth file; nothing is installed there).
#
# Usage (from the repository root):
#   ORT_GPU_WHEEL=/path/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl bash bench/gpu.sh
#   bash bench/gpu.sh /path/onnxruntime_gpu-*.whl            # the same, the wheel as the first argument
#   GPU_SITE=/tmp/tessera-kit/site bash bench/gpu.sh         # the packages unpacked by bench/gpu_kit.py
# Environment (all optional but the wheel or GPU_SITE):
#   GPU_SITE       a folder of packages installed for this Python (bench/gpu_kit.py: onnxruntime-gpu,
#                  rasterio, shapely, boto3, psycopg, SAHI): put first on PYTHONPATH, no virtualenv made, and
#                  SAHI's side of bench/sahi_compare.py runs on the same interpreter (--sahi-python)
#   ORT_GPU_WHEEL  the onnxruntime-gpu wheel file (or the first argument)
#   WHEEL_DIR      a folder of more wheels (pip --find-links): nvidia-* CUDA/cuDNN wheels (installed into
#                  the virtualenv when there), tessera dependencies the machine lacks, and what SAHI's own
#                  virtualenv needs (sahi, opencv-python, shapely, matplotlib, ...: bench/requirements-sahi.txt)
#   PYTHON         the interpreter to build on (default: python3)
#   GPU_VENV       the virtualenv (default: ${TMPDIR:-/tmp}/tessera-gpu-venv; re-used when it exists)
#   SAHI_VENV      SAHI's virtualenv for bench/sahi_compare.py (default: the benchmark's own)
#   SAHI_PYTHON    an interpreter that has SAHI already, for bench/sahi_compare.py (default with GPU_SITE:
#                  PYTHON)
#   STEPS          the steps to run, space-separated (default: all, in this order): smi setup imports
#                  ort session floor floor-demo pipeline sahi sahi-near-free training trainer-device
#                  (setup always runs: the others need its virtualenv)
#   QUICK=1        every benchmark with --quick (a smoke run of the whole script in a few minutes)
#   REPEAT=N       --repeat N for floor, pipeline and sahi_compare (their defaults: 3, 3, 1)
#   STEP_TIMEOUT   seconds one step may run (default 900)
#   OUT            a folder collected by the device runner: the log is written there as gpu-bench.log
#                  (default: ./gpu-bench.log)
#   TESSERA_BENCH_DATA  where the benchmarks cache their scenes and models (default /tmp/tessera-bench)
# No step stops the script: each one's exit status is reported under its header and in the summary at the
# end, and the script exits 0 when every step passed, 1 otherwise.

set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

ORT_GPU_WHEEL="${1:-${ORT_GPU_WHEEL:-}}"
GPU_SITE="${GPU_SITE:-}"
WHEEL_DIR="${WHEEL_DIR:-}"
PYTHON="${PYTHON:-python3}"
GPU_VENV="${GPU_VENV:-${TMPDIR:-/tmp}/tessera-gpu-venv}"
STEPS="${STEPS:-smi setup imports ort session floor floor-demo pipeline sahi sahi-near-free training trainer-device}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
QUICK="${QUICK:-}"
REPEAT="${REPEAT:-}"
MODEL="services/models/tessera-demo-detector.onnx"

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu-bench.log"
else
    LOG="$REPO/gpu-bench.log"
fi
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# Offline: every pip call (this script's and the SAHI benchmark's, which builds its own virtualenv) takes
# packages only from the wheel file's folder and WHEEL_DIR.
export PIP_NO_INDEX=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
FIND_LINKS=()
[[ -n "$ORT_GPU_WHEEL" ]] && FIND_LINKS+=("$(dirname "$ORT_GPU_WHEEL")")
[[ -n "$WHEEL_DIR" ]] && FIND_LINKS+=("$WHEEL_DIR")
if ((${#FIND_LINKS[@]})); then
    export PIP_FIND_LINKS="${FIND_LINKS[*]}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$GPU_SITE" ]]; then
    # Before the interpreter's own site-packages: the kit's onnxruntime-gpu wins over the CPU onnxruntime.
    # The repository stays first: a package in the kit can never hide tessera's own modules.
    export PYTHONPATH="$REPO:$GPU_SITE${PYTHONPATH#"$REPO"}"
fi
export PYTHONUNBUFFERED=1

declare -a SUMMARY=()
FAILED=0
LAST_RC=0

header() {
    printf '\n==================================================================================\n'
    printf '== %s\n' "$*"
    printf '== %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    printf '==================================================================================\n'
}

wanted() {
    [[ " $STEPS " == *" $1 "* ]]
}

# run_step NAME DESCRIPTION COMMAND...: header, the command (a program under STEP_TIMEOUT, or a function of
# this script in a subshell), its exit status recorded in LAST_RC and the summary.
run_step() {
    local name="$1" what="$2"
    shift 2
    LAST_RC=0
    if ! wanted "$name"; then
        SUMMARY+=("$(printf '%-16s skipped (not in STEPS)' "$name")")
        return 0
    fi
    header "$name: $what"
    local started rc seconds
    started=$(date +%s)
    if declare -F "$1" >/dev/null; then
        ("$@")
    else
        local shown="$*"
        [[ "$shown" == *$'\n'* ]] && shown="${shown%%$'\n'*} ..."
        printf '+ %s\n' "$shown"
        timeout -k 30 "$STEP_TIMEOUT" "$@"
    fi
    rc=$?
    LAST_RC=$rc
    seconds=$(($(date +%s) - started))
    if ((rc == 0)); then
        printf -- '-- %s: OK (%d s)\n' "$name" "$seconds"
        SUMMARY+=("$(printf '%-16s OK      %5d s' "$name" "$seconds")")
    else
        if ((rc == 124 || rc == 137)); then
            printf -- '-- %s: TIMED OUT after %d s (STEP_TIMEOUT=%s)\n' "$name" "$seconds" "$STEP_TIMEOUT"
        else
            printf -- '-- %s: FAILED, exit %d (%d s)\n' "$name" "$rc" "$seconds"
        fi
        SUMMARY+=("$(printf '%-16s FAILED  %5d s  exit %d' "$name" "$seconds" "$rc")")
        FAILED=1
    fi
    return 0
}

header "bench/gpu.sh: ${HOSTNAME:-?} in $REPO, log $LOG"
echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
echo "GPU_SITE=${GPU_SITE:-<none>}  ORT_GPU_WHEEL=${ORT_GPU_WHEEL:-<none>}  WHEEL_DIR=${WHEEL_DIR:-<none>}  PYTHON=$PYTHON  GPU_VENV=$GPU_VENV"
echo "STEPS=$STEPS  QUICK=${QUICK:-}  REPEAT=${REPEAT:-}  STEP_TIMEOUT=$STEP_TIMEOUT"
echo "PIP_FIND_LINKS=$PIP_FIND_LINKS  TESSERA_BENCH_DATA=${TESSERA_BENCH_DATA:-/tmp/tessera-bench}"
echo "CPU: $(nproc) cores; memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"

# --- nvidia-smi ------------------------------------------------------------------------------------------
run_step smi "nvidia-smi" bash -c 'nvidia-smi && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv'

# --- the virtualenv with onnxruntime-gpu ---------------------------------------------------------------------
# shellcheck disable=SC2317,SC2329  # run through run_step
setup_venv() {
    if [[ -z "$ORT_GPU_WHEEL" || ! -f "$ORT_GPU_WHEEL" ]]; then
        echo "no onnxruntime-gpu wheel: set ORT_GPU_WHEEL=/path/onnxruntime_gpu-*.whl (or pass it as \$1)"
        return 1
    fi
    "$PYTHON" -c 'import sys; print("base Python", sys.version.split()[0], sys.executable)' || return 1
    if [[ ! -x "$GPU_VENV/bin/python" ]]; then
        # Without pip when ensurepip is missing (Debian's python3 without python3-venv): the base's pip,
        # visible through the .pth below, installs into the virtualenv all the same.
        "$PYTHON" -m venv "$GPU_VENV" || "$PYTHON" -m venv --without-pip "$GPU_VENV" || return 1
    fi
    local vpy="$GPU_VENV/bin/python" site
    site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    # The base interpreter's packages (torch, numpy, rasterio, ...) after the virtualenv's own, so that the
    # virtualenv's onnxruntime-gpu wins over the machine's CPU onnxruntime. site.addsitedir also runs their
    # .pth files. Works whether PYTHON is a system Python or itself a virtualenv's.
    "$PYTHON" - "$site/tessera-base-site.pth" <<'PY' || return 1
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
line = "import site; list(map(site.addsitedir, %r))\n" % (dirs,)
open(sys.argv[1], "w").write(line)
print("base site-packages, visible from the virtualenv:", ", ".join(dirs))
PY
    "$vpy" -m pip --version || return 1
    # Its dependencies (numpy, protobuf, flatbuffers, ...) are the base's; --no-deps when one is missing there.
    "$vpy" -m pip install --no-index "$ORT_GPU_WHEEL" \
        || "$vpy" -m pip install --no-index --no-deps "$ORT_GPU_WHEEL" \
        || return 1
    if [[ -n "$WHEEL_DIR" ]] && compgen -G "$WHEEL_DIR/nvidia_*.whl" >/dev/null; then
        echo "installing the nvidia-* wheels of $WHEEL_DIR into the virtualenv"
        "$vpy" -m pip install --no-index --find-links "$WHEEL_DIR" "$WHEEL_DIR"/nvidia_*.whl \
            || echo "WARNING: the nvidia-* wheels did not install"
    fi
    link_nvidia "$site"
    ort_from "$vpy" "$GPU_VENV"
}

# link_nvidia FOLDER: ONNX Runtime's preload_dlls() looks for pip's CUDA/cuDNN beside itself
# (<FOLDER>/nvidia/...), as in an image or a virtualenv where torch or onnxruntime-gpu[cuda,cudnn] installed
# them. Here they are torch's, in the base: linked in, so that the checks below see what such an environment
# has.
# shellcheck disable=SC2317,SC2329  # called by the set-up steps
link_nvidia() {
    local folder="$1" base_nvidia
    if [[ ! -e "$folder/nvidia" ]]; then
        base_nvidia="$(cd / && PYTHONPATH='' "$PYTHON" -c 'import nvidia; print(next(iter(nvidia.__path__)))' 2>/dev/null)"
        if [[ -n "$base_nvidia" && -d "$base_nvidia" ]]; then
            ln -s "$base_nvidia" "$folder/nvidia" && echo "linked $folder/nvidia -> $base_nvidia (torch's CUDA/cuDNN wheels)"
        else
            echo "no nvidia-* pip packages in the base: CUDA/cuDNN must come from the system (ldconfig)"
        fi
    fi
    for lib in "$folder"/nvidia/*/lib; do
        [[ -d "$lib" ]] && echo "  $lib: $(find "$lib" -maxdepth 1 -name '*.so*' | wc -l) libraries"
    done
    return 0
}

# ort_from PYTHON FOLDER: which onnxruntime PYTHON imports, its providers; fails unless it comes from FOLDER
# (not the machine's CPU build).
# shellcheck disable=SC2317,SC2329  # called by the set-up steps
ort_from() {
    "$1" - "$2" <<'PY'
import os, sys
import onnxruntime as o
print("onnxruntime", o.__version__, "from", o.__file__, "built for CUDA", getattr(o, "cuda_version", "?"))
print("providers listed:", o.get_available_providers())
if not os.path.realpath(o.__file__).startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"FAIL: onnxruntime is imported from outside {sys.argv[1]} (the machine's CPU build?)")
PY
}
# --- or the packages bench/gpu_kit.py unpacked (GPU_SITE) -------------------------------------------------------
# shellcheck disable=SC2317,SC2329  # run through run_step
setup_site() {
    if [[ ! -d "$GPU_SITE/onnxruntime" ]]; then
        echo "GPU_SITE=$GPU_SITE has no onnxruntime: run python3 bench/gpu_kit.py unpack first"
        return 1
    fi
    "$PYTHON" -c 'import sys; print("Python", sys.version.split()[0], sys.executable)' || return 1
    link_nvidia "$GPU_SITE"
    ort_from "$PYTHON" "$GPU_SITE"
}
if [[ " $STEPS " != *" setup "* ]]; then
    STEPS="$STEPS setup"
fi
if [[ -n "$GPU_SITE" ]]; then
    run_step setup "the packages in GPU_SITE ($GPU_SITE) on $PYTHON" setup_site
    PY="$PYTHON"
    : "${SAHI_PYTHON:=$PYTHON}"
else
    run_step setup "a virtualenv with the onnxruntime-gpu wheel ($GPU_VENV)" setup_venv
    if [[ -x "$GPU_VENV/bin/python" ]] && "$GPU_VENV/bin/python" -c 'import onnxruntime' 2>/dev/null; then
        PY="$GPU_VENV/bin/python"
    else
        PY="$PYTHON"
        echo "WARNING: no usable virtualenv: the steps below run on $PYTHON (CPU onnxruntime: CUDA steps will fail)"
    fi
fi
echo "python for the steps below: $PY"

# --- what the benchmarks import ------------------------------------------------------------------------------
# shellcheck disable=SC2317,SC2329  # run through run_step
check_imports() {
    local missing
    missing="$("$PY" - <<'PY'
import importlib
dists = {"numpy": "numpy", "rasterio": "rasterio", "shapely": "shapely", "PIL": "pillow", "boto3": "boto3",
         "psycopg": "psycopg[binary]", "onnx": "onnx", "onnxruntime": "onnxruntime-gpu", "torch": "torch"}
gone = []
for module, dist in dists.items():
    try:
        mod = importlib.import_module(module)
        print(f"  {module:12} {getattr(mod, '__version__', '?'):14} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"  {module:12} MISSING        {type(exc).__name__}: {exc}")
        gone.append(dist)
print("MISSING=" + " ".join(gone))
PY
)"
    echo "$missing" | grep -v '^MISSING='
    missing="$(echo "$missing" | sed -n 's/^MISSING=//p')"
    [[ -z "$missing" ]] && return 0
    if [[ -n "$WHEEL_DIR" ]]; then
        echo "installing the missing ($missing) from $WHEEL_DIR"
        # shellcheck disable=SC2086  # one word per distribution
        "$PY" -m pip install --no-index --find-links "$WHEEL_DIR" $missing || return 1
        return 0
    fi
    echo "missing: $missing (give WHEEL_DIR with their wheels)"
    return 1
}
run_step imports "the packages the benchmarks import" check_imports

# --- ONNX Runtime's CUDA provider, bare: preload_dlls(), then a session on the demo detector ------------------
read -r -d '' ORT_CHECK <<'PY'
import sys, time
import numpy as np
import onnxruntime as ort

print("onnxruntime", ort.__version__, "built for CUDA", getattr(ort, "cuda_version", "?"))
print("providers listed:", ort.get_available_providers())
if hasattr(ort, "preload_dlls"):
    started = time.perf_counter()
    ort.preload_dlls()  # prints the libraries it could not load
    print(f"preload_dlls() {time.perf_counter() - started:.3f} s")
else:
    print("this onnxruntime has no preload_dlls (< 1.21)")
if hasattr(ort, "print_debug_info"):
    try:
        ort.print_debug_info()
    except Exception as exc:
        print("print_debug_info failed:", exc)
started = time.perf_counter()
session = ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(f"session {time.perf_counter() - started:.2f} s; providers in use: {session.get_providers()}")
shape = [d if isinstance(d, int) else 8 for d in session.get_inputs()[0].shape]
batch = np.random.default_rng(0).random(shape, dtype=np.float32)
name = session.get_inputs()[0].name
session.run(None, {name: batch})
started = time.perf_counter()
for _ in range(20):
    session.run(None, {name: batch})
each = (time.perf_counter() - started) / 20
print(f"one batch {shape}: {each * 1000:.2f} ms ({shape[0] / each:,.0f} tiles/s)")
with open("/proc/self/maps") as maps:
    libs = sorted({l.split()[-1] for l in maps if any(k in l for k in ("libcu", "libcudnn", "libnvrtc", "libcurand"))})
print("CUDA libraries loaded:", *libs, sep="\n  ")
if session.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit("FAIL: the session runs on " + session.get_providers()[0])
print("PASS: CUDAExecutionProvider runs the demo detector")
PY
run_step ort "ONNX Runtime: preload_dlls(), then a CUDA session on $MODEL" "$PY" -c "$ORT_CHECK" "$MODEL"

# --- the same through tessera: services/inference/session.py (its own preload_dlls call) ---------------------
read -r -d '' SESSION_CHECK <<'PY'
import logging, sys, time
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
from services.inference.detector import OnnxDetector
from services.inference.session import create_session

started = time.perf_counter()
opened = create_session(sys.argv[1], providers="cuda")  # a UserError unless CUDA really runs
print(f"create_session(providers='cuda'): {opened.provider} in {time.perf_counter() - started:.2f} s")
detector = OnnxDetector(sys.argv[1], providers="auto")
print("OnnxDetector(providers='auto'):", detector.provider, "batch", detector.batch_size)
print("PASS: tessera's sessions run on CUDA")
PY
run_step session "tessera's create_session(providers='cuda') without LD_LIBRARY_PATH" \
    "$PY" -c "$SESSION_CHECK" "$MODEL"
if wanted session && ((LAST_RC != 0)); then
    # Still the benchmarks' figures are wanted: point the loader at the nvidia-* libraries and say so.
    NVIDIA_LIBS="$("$PY" -c 'import glob, nvidia; print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(p + "/*/lib")})))' 2>/dev/null)"
    if [[ -n "$NVIDIA_LIBS" ]]; then
        export LD_LIBRARY_PATH="$NVIDIA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "FALLBACK for the steps below: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        run_step session "tessera's create_session(providers='cuda') WITH LD_LIBRARY_PATH (fallback)" \
            "$PY" -c "$SESSION_CHECK" "$MODEL"
    fi
fi

# --- the benchmarks on the GPU ---------------------------------------------------------------------------------
BENCH=()
[[ -n "$QUICK" ]] && BENCH+=(--quick)
REPEATS=()
[[ -n "$REPEAT" ]] && REPEATS+=(--repeat "$REPEAT")
SAHI_ARGS=()
[[ -n "${SAHI_VENV:-}" ]] && SAHI_ARGS+=(--sahi-venv "$SAHI_VENV")
[[ -n "${SAHI_PYTHON:-}" ]] && SAHI_ARGS+=(--sahi-python "$SAHI_PYTHON")

run_step floor "bench/floor.py --providers cuda (near-free model)" \
    "$PY" bench/floor.py --providers cuda "${BENCH[@]}" "${REPEATS[@]}"
run_step floor-demo "bench/floor.py --model demo --providers cuda" \
    "$PY" bench/floor.py --model demo --providers cuda "${BENCH[@]}" "${REPEATS[@]}"
run_step pipeline "bench/pipeline.py --providers cuda" \
    "$PY" bench/pipeline.py --providers cuda "${BENCH[@]}" "${REPEATS[@]}"
run_step sahi "bench/sahi_compare.py --providers cuda --size 16384 (demo detector)" \
    "$PY" bench/sahi_compare.py --providers cuda --size 16384 "${BENCH[@]}" "${REPEATS[@]}" "${SAHI_ARGS[@]}"
run_step sahi-near-free "bench/sahi_compare.py --providers cuda, the near-free case" \
    "$PY" bench/sahi_compare.py --providers cuda --model near-free --size 16000 --block 256 --overlap 128 \
    "${BENCH[@]}" "${REPEATS[@]}" "${SAHI_ARGS[@]}"
run_step training "bench/training.py --device cuda" \
    "$PY" bench/training.py --device cuda "${BENCH[@]}"
run_step trainer-device "bench/trainer_device_check.py" \
    "$PY" bench/trainer_device_check.py

# --- summary ------------------------------------------------------------------------------------------------
header "summary (log: $LOG)"
printf '%s\n' "${SUMMARY[@]}"
grep -h '^RESULT ' "$LOG" 2>/dev/null | sort -u
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$FAILED"
