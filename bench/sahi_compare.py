"""Against SAHI: tessera and SAHI's sliced prediction on the same image, model, slicing; wall time and RSS.

Run: ``.venv/bin/python bench/sahi_compare.py`` (an 8,192 x 8,192 px scene in 512 px blocks, the shipped
demo detector; ``--quick`` for a smoke run). The issue's near-free case, where the pipelines' own costs
show: ``--model near-free --size 16000 --block 256 --overlap 128``.

``--model``: ``demo`` (the shipped demo detector, the default), ``near-free`` (a detector-contract model
that costs almost nothing, built by ``harness.near_free_model``) or the path of any detector-contract ONNX
file with the three outputs (boxes, scores, labels). Both sides run that model on the same ONNX Runtime
provider (``--providers``; same graph optimisations, same default thread count) in batches of one size
(``--batch``; by default what ``tessera run`` picks: 2 tiles of 512 px on a CPU, 8 on a GPU), over the
same tiles (the model's input size) with the same overlap, on the same GeoTIFF (``--block`` px blocks),
each in its own child process, whose wall time and peak RSS (``wait4``) are measured:

- **tessera**: what ``tessera run`` runs between opening the image and writing its outputs
  (``pipeline.detect_image``): every region through ``detect_region`` (lazy block-aligned reads, prefetch,
  batches, the model, the in-region merge), the next region's reads started while one drains, then the seam
  merge.
- **SAHI**: ``sahi.predict.get_sliced_prediction`` with a ``DetectionModel`` subclass wrapping the same
  ONNX file in ONNX Runtime (no torch), batched natively; SAHI decodes the whole image (OpenCV), slices it,
  and merges with its own postprocess (default GREEDYNMM on IOS 0.5, class-aware; no extra full-image
  prediction, since the model takes fixed-size tiles only). Class names come from the model's metadata
  ``tessera.class_names``, input scaling from ``tessera.input_scale`` (default 1/255), as tessera reads them.

Also reported: each side's time to its first tile — from the child's start (the parent's clock just before
it spawns the process) to the first batch's detections back from the model; SAHI decodes the whole image
first, tessera reads the blocks the first batch needs.

SAHI lives in its own virtualenv, created on first use (``--sahi-venv``; ``bench/requirements-sahi.txt``
plus the project environment's numpy, onnxruntime-gpu and pillow versions), never in the project's; or, on a
machine without a package index, ``--sahi-python`` names an interpreter that has it already.
Detections of both are scored against the scene's known objects (precision/recall at IoU 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

SPEED_GOAL = 4.0  # tessera at least this many times faster
RSS_GOAL = 0.25  # tessera's peak RSS at most this fraction of SAHI's
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-sahi.txt"
PINNED_FROM_PROJECT = ("numpy", "onnxruntime-gpu", "pillow")
SCORE_THRESHOLD = 0.25  # the request default (MergeSettings.score_threshold)
CLASS_NAMES_KEY = "tessera.class_names"
INPUT_SCALE_KEY = "tessera.input_scale"


def pip_cuda_libraries() -> list[str]:
    """The ``lib`` folders of the project environment's ``nvidia-*`` pip packages (CUDA, cuDNN; [] if none).

    SAHI's virtualenv has none of its own: its child gets these on ``LD_LIBRARY_PATH``, so that with
    ``--providers cuda`` both sides run on the same CUDA and cuDNN.
    """
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return sorted({str(lib.resolve()) for root in roots for lib in Path(root).glob("*/lib") if lib.is_dir()})


def preload_cuda(ort: Any) -> None:
    """``onnxruntime.preload_dlls()`` (CUDA/cuDNN from pip packages) for the SAHI side, as tessera's sessions
    do (``services.inference.session``); what it prints about missing libraries is dropped."""
    import contextlib
    import io

    if hasattr(ort, "preload_dlls"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                ort.preload_dlls()
        except Exception as exc:  # the session below then says which provider it got
            print(f"onnxruntime.preload_dlls() failed: {exc}")


def given_sahi(python: Path) -> Path:
    """``--sahi-python``: checked to import SAHI, then used as it is."""
    done = subprocess.run(
        [str(python), "-c", "import sahi, cv2, onnxruntime; print(sahi.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"--sahi-python {python} cannot import sahi, cv2 and onnxruntime: {tail}")
    print(f"SAHI {done.stdout.strip()} from {python} (--sahi-python: no virtualenv made)", flush=True)
    return python


def ensure_sahi_venv(venv: Path) -> Path:
    """The Python of SAHI's virtualenv, created (or re-created when its requirements changed) first."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    pins = [f"{name}=={version(name)}" for name in PINNED_FROM_PROJECT]
    listed = [
        line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    wanted = "\n".join(pins + listed) + "\n"
    stamp = venv / "tessera-bench-requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"creating SAHI's virtualenv {venv} ({', '.join(pins + listed)}) ...", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *pins, *listed], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stdout + done.stderr)
        raise SystemExit(f"could not install SAHI into {venv} (pip exit {done.returncode})")
    stamp.write_text(wanted)
    return python


# --- the two children --------------------------------------------------------------------------------


def tessera_child(args: argparse.Namespace) -> None:
    """Detect over the whole image as `tessera run` does (no outputs written); save the boxes and figures."""
    started = time.perf_counter()
    from services.inference.detector import OnnxDetector
    from services.model_runner import pipeline
    from services.model_runner.request import DEFAULT_REGION, MergeSettings
    from services.tiling.reader import RasterSource

    imported = time.perf_counter()
    detector = OnnxDetector(
        args.model, providers=args.providers, batch_size=args.batch, score_threshold=SCORE_THRESHOLD
    )
    grid = pipeline.Grid(
        detector.tile_width, detector.tile_height, args.overlap, args.overlap, DEFAULT_REGION, DEFAULT_REGION
    )
    first_tile: list[float] = []  # wall clock when the first batch's detections came back

    def progress(_done: int) -> None:
        if not first_tile:
            first_tile.append(time.time())

    with RasterSource.open(args.image) as source:
        plan = pipeline.plan_job(grid, source, None)
        found = pipeline.detect_image(source, detector, plan, MergeSettings(), on_tiles=progress).detections
        tiles = plan.tiles_total
    done = time.perf_counter()
    np.savez(args.out, boxes=found.boxes, scores=found.scores, labels=found.labels)
    harness.report_child(
        {
            "import_s": imported - started,
            "work_s": done - imported,
            "tiles": tiles,
            "tile": [detector.tile_width, detector.tile_height],
            "detections": len(found),
            "peak_rss": harness.peak_rss_bytes(),
            "provider": detector.provider,
            "first_tile_s": first_tile[0] - args.spawned_at if first_tile and args.spawned_at else None,
        }
    )


def sahi_child(args: argparse.Namespace) -> None:
    """SAHI's sliced prediction with the same ONNX model; save the boxes; print the figures."""
    started = time.perf_counter()
    from importlib.metadata import version

    import onnxruntime as ort
    from sahi.models.base import DetectionModel  # type: ignore[import-not-found]
    from sahi.predict import get_sliced_prediction  # type: ignore[import-not-found]
    from sahi.prediction import ObjectPrediction  # type: ignore[import-not-found]

    first_tile: list[float] = []  # wall clock when the first batch's detections came back

    class OnnxSahiModel(DetectionModel):
        """The tessera detector contract (boxes/scores/labels outputs, input scaled as the metadata's
        ``tessera.input_scale`` says, class names from ``tessera.class_names``) as a SAHI model."""

        def load_model(self) -> None:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = ["CPUExecutionProvider"]
            if args.providers != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
                preload_cuda(ort)
                providers.insert(0, "CUDAExecutionProvider")
            self.set_model(ort.InferenceSession(self.model_path, options, providers=providers))

        def set_model(self, model: Any, **kwargs: Any) -> None:
            from fractions import Fraction

            self.model = model
            metadata = model.get_modelmeta().custom_metadata_map
            self._names = [str(n) for n in json.loads(metadata.get(CLASS_NAMES_KEY, "[]"))]
            self.category_mapping = {str(i): name for i, name in enumerate(self._names)}
            self._scale = np.float32(Fraction(metadata.get(INPUT_SCALE_KEY, "1/255").strip()))
            shape = model.get_inputs()[0].shape
            if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
                raise SystemExit(f"{self.model_path}: the input's H and W must be fixed (it has {shape})")
            self._tile = (int(shape[2]), int(shape[3]))
            # The three outputs told apart by name as tessera does (box / score, conf / label, class), else
            # taken in order: boxes, scores, labels.
            names = [o.name.lower() for o in model.get_outputs()]
            if len(names) != 3:
                raise SystemExit(
                    f"{self.model_path}: the SAHI side takes the three-output detector contract (boxes, "
                    f"scores, labels); this model has {len(names)} outputs"
                )
            order = []
            for keys in (("box",), ("score", "conf"), ("label", "class")):
                order.append(next((i for i, n in enumerate(names) if any(k in n for k in keys)), -1))
            self._order = order if sorted(order) == [0, 1, 2] else [0, 1, 2]

        def category_name(self, label: int) -> str:
            return self._names[label] if 0 <= label < len(self._names) else str(label)

        def perform_inference(self, image: np.ndarray) -> None:
            self._run([image])

        def perform_batch_inference(self, images: list[np.ndarray]) -> None:
            # Native batching (as SAHI's Ultralytics model does): one session run per batch of slices.
            self._run(images)

        def _run(self, images: list[np.ndarray]) -> None:
            h, w = self._tile
            batch = np.zeros((len(images), 3, h, w), np.float32)
            for i, image in enumerate(images):  # HWC uint8 RGB -> CHW float32 x scale; edge slices padded
                batch[i, :, : image.shape[0], : image.shape[1]] = image.transpose(2, 0, 1)[:3] * self._scale
            outputs = self.model.run(None, {self.model.get_inputs()[0].name: batch})
            self._original_predictions = [outputs[k] for k in self._order]
            if not first_tile:
                first_tile.append(time.time())

        def _create_object_prediction_list_from_original_predictions(
            self,
            shift_amount_list: list[list[int | float]] | None = None,
            full_shape_list: list[list[int | float]] | None = None,
        ) -> None:
            boxes, scores, labels = self._original_predictions
            labels = labels.astype(np.int64)
            per_image = []
            for i in range(boxes.shape[0]):
                # Below the threshold or a negative label: padding (as tessera's detector reads it).
                keep = np.flatnonzero((scores[i] >= self.confidence_threshold) & (labels[i] >= 0))
                shift = shift_amount_list[i] if shift_amount_list else [0, 0]
                full = full_shape_list[i] if full_shape_list else None
                per_image.append(
                    [
                        ObjectPrediction(
                            bbox=boxes[i, k].tolist(),
                            category_id=int(labels[i, k]),
                            category_name=self.category_name(int(labels[i, k])),
                            score=float(scores[i, k]),
                            shift_amount=shift,
                            full_shape=full,
                        )
                        for k in keep
                    ]
                )
            self._object_prediction_list_per_image = per_image

    imported = time.perf_counter()
    # SAHI's own device setting is for torch models (none here); ONNX Runtime's providers are chosen above.
    model = OnnxSahiModel(model_path=str(args.model), confidence_threshold=SCORE_THRESHOLD, device="cpu")
    provider = model.model.get_providers()[0]
    if args.providers == "cuda" and provider != "CUDAExecutionProvider":
        raise SystemExit(f"CUDA was requested but SAHI's ONNX Runtime session runs on {provider}")
    tile_h, tile_w = model._tile
    ratio_h, ratio_w = args.overlap / tile_h, args.overlap / tile_w
    result = get_sliced_prediction(
        args.image,
        model,
        slice_height=tile_h,
        slice_width=tile_w,
        overlap_height_ratio=ratio_h,
        overlap_width_ratio=ratio_w,
        perform_standard_pred=False,
        postprocess_type=args.postprocess,
        postprocess_match_metric=args.match_metric,
        postprocess_match_threshold=args.match_threshold,
        batch_size=args.batch,
        verbose=0,
    )
    done = time.perf_counter()
    predictions = result.object_prediction_list
    boxes = np.array([p.bbox.to_xyxy() for p in predictions], np.float32).reshape(-1, 4)
    scores = np.array([p.score.value for p in predictions], np.float32)
    labels = np.array([p.category.id for p in predictions], np.int32)
    np.savez(args.out, boxes=boxes, scores=scores, labels=labels)
    # Count the slices as SAHI made them (same rule as its get_sliced_prediction).
    from sahi.slicing import get_slice_bboxes  # type: ignore[import-not-found]

    # The result's size comes from the file header (result.image would decode the image again).
    height, width = result.image_height, result.image_width
    slices = get_slice_bboxes(height, width, tile_h, tile_w, False, ratio_h, ratio_w)
    harness.report_child(
        {
            "import_s": imported - started,
            "work_s": done - imported,
            "tiles": len(slices),
            "detections": len(predictions),
            "peak_rss": harness.peak_rss_bytes(),
            "durations": {k: float(v) for k, v in result.durations_in_seconds.items()},
            "sahi": version("sahi"),
            "provider": provider,
            "first_tile_s": first_tile[0] - args.spawned_at if first_tile and args.spawned_at else None,
        }
    )


# --- the parent --------------------------------------------------------------------------------------


def score(npz: Path, scene: harness.SceneFile) -> tuple[float, float]:
    """Precision and recall of saved detections against the scene's known objects (IoU 0.5)."""
    from services.scenes.scoring import score_detections

    with np.load(npz) as d:
        s = score_detections(d["boxes"], d["scores"], d["labels"], scene.layout.boxes, scene.layout.labels)
    return s.precision, s.recall


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the scene and SAHI's virtualenv, run both children, print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192, help="image width and height in px (8192)")
    p.add_argument("--block", type=int, default=512, help="the GeoTIFF's block size in px (512)")
    p.add_argument(
        "--model",
        default="demo",
        help="demo (the shipped demo detector, default), near-free, or a detector-contract ONNX file's path",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="tiles per model call, both sides (default: what tessera run picks for the model on the "
        "provider, detector.default_batch_size: 2 tiles of 512 x 512 x 3 on a CPU, 8 on a GPU)",
    )
    p.add_argument("--overlap", type=int, default=64, help="px (64: tessera's default for 512 px tiles)")
    p.add_argument("--postprocess", default="GREEDYNMM", help="SAHI postprocess: GREEDYNMM, NMM, NMS")
    p.add_argument("--match-metric", default="IOS", help="SAHI match metric: IOS or IOU")
    p.add_argument("--match-threshold", type=float, default=0.5)
    p.add_argument(
        "--gdal-cachemax",
        default="reader",
        help="GDAL block cache for tessera's child: 'reader' (what the reader sets, 32 MB), MB, or "
        "'default' for GDAL's own (5%% of RAM)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs of each side; the fastest is reported")
    p.add_argument(
        "--providers",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="ONNX Runtime provider of both sides (default cpu; cuda where a GPU is)",
    )
    p.add_argument("--data-dir", type=Path, default=harness.DEFAULT_DATA_DIR)
    p.add_argument("--sahi-venv", type=Path, default=harness.DEFAULT_DATA_DIR / "sahi-venv")
    p.add_argument(
        "--sahi-python",
        type=Path,
        help="an interpreter that has SAHI already (and numpy, onnxruntime, pillow, OpenCV): SAHI's side "
        "runs on it as it is, no virtualenv is made (a machine without a package index: bench/gpu_kit.py)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: a 1024 px image")
    p.add_argument("--child", choices=("tessera", "sahi"), help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--spawned-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "tessera":
        tessera_child(args)
        return 0
    if args.child == "sahi":
        sahi_child(args)
        return 0
    if args.quick:
        args.size = 1024

    model = harness.model_by_name(args.model, args.data_dir)
    scene = harness.scene_file(args.data_dir, args.size, args.size, block_size=args.block)
    if args.sahi_python is not None:
        sahi_python = given_sahi(args.sahi_python)
    else:
        sahi_python = ensure_sahi_venv(args.sahi_venv)
    if args.batch is None:
        from services.inference.detector import OnnxDetector  # here: the SAHI child's venv has no tessera

        probe = OnnxDetector(model, providers=args.providers, batch_size=None)
        args.batch = probe.batch_size
        probe.close()
        del probe  # its sessions (a CUDA context on a GPU) must not sit in this process while children run
    common = ["--image", str(scene.path), "--batch", str(args.batch), "--overlap", str(args.overlap)]
    common += ["--providers", args.providers, "--model", str(model)]
    sahi_opts = ["--postprocess", args.postprocess, "--match-metric", args.match_metric]
    sahi_opts += ["--match-threshold", str(args.match_threshold)]
    runs: dict[str, harness.ChildRun] = {}
    env = {**os.environ, "OPENCV_LOG_LEVEL": "ERROR"}  # OpenCV warns about every GeoTIFF tag it skips
    env.pop("GDAL_CACHEMAX", None)
    if args.gdal_cachemax == "reader":
        from services.tiling.reader import GDAL_CACHE_MB  # here: the SAHI child's venv has no rasterio

        cache = f"GDAL_CACHEMAX={GDAL_CACHE_MB} MB (the reader's)"
    elif args.gdal_cachemax == "default":
        env["GDAL_CACHEMAX"] = "5%"  # the reader's own setting yields to this: GDAL's default
        cache = "GDAL's default block cache (5% of RAM)"
    else:
        env["GDAL_CACHEMAX"] = str(int(args.gdal_cachemax))
        cache = f"GDAL_CACHEMAX={int(args.gdal_cachemax)} MB"
    sahi_env = dict(env)
    cuda_libraries = pip_cuda_libraries() if args.providers != "cpu" else []
    if cuda_libraries:
        sahi_env["LD_LIBRARY_PATH"] = ":".join([*cuda_libraries, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    for _ in range(max(1, args.repeat)):
        for side, python, extra in (("tessera", sys.executable, []), ("sahi", str(sahi_python), sahi_opts)):
            out = args.data_dir / f"detections-{side}-{args.size}.npz"
            argv_child = [python, __file__, "--child", side, *common, "--out", str(out), *extra]
            argv_child += ["--spawned-at", repr(time.time())]
            child_env = sahi_env if side == "sahi" else env
            run = harness.run_measured(argv_child, env=child_env, echo=lambda line: print("  | " + line))
            if run.returncode != 0 or not run.result:
                print(run.output)
                raise SystemExit(f"the {side} run failed (exit {run.returncode})")
            if side not in runs or run.seconds < runs[side].seconds:
                runs[side] = run
    t, s = runs["tessera"], runs["sahi"]
    pt, rt = score(args.data_dir / f"detections-tessera-{args.size}.npz", scene)
    ps, rs = score(args.data_dir / f"detections-sahi-{args.size}.npz", scene)
    speedup = s.seconds / t.seconds
    rss_ratio = t.max_rss_bytes / s.max_rss_bytes

    import onnxruntime  # the versions for the machine line
    import rasterio  # noqa: F401

    print(
        f"image           {args.size:,} x {args.size:,} px, 3 x uint8 GeoTIFF, {args.block} px blocks, "
        f"DEFLATE ({scene.path.stat().st_size / 1e6:,.0f} MB; {args.size**2 * 3 / 1e6:,.0f} MB decoded); "
        f"{len(scene.layout):,} known objects"
    )
    tile_w, tile_h = t.result.get("tile", ["?", "?"])
    on = {
        side: str(run.result.get("provider", "?")).removesuffix("ExecutionProvider")
        for side, run in runs.items()
    }
    print(
        f"model           {model.name} ({args.model}), ONNX Runtime {onnxruntime.__version__}, tessera on "
        f"{on['tessera']}, SAHI on {on['sahi']}; batch {args.batch}; {tile_w} x {tile_h} px tiles, overlap "
        f"{args.overlap} px"
    )
    print(f"tessera         tessera run's pipeline (detect_image: regions read ahead, seam merge); {cache}")
    print(
        f"SAHI            {s.result.get('sahi', '?')}: {args.postprocess} / {args.match_metric} "
        f"{args.match_threshold}, class-aware, no standard (full-image) prediction"
    )
    if cuda_libraries:
        print("CUDA, cuDNN     the project environment's nvidia-* packages (SAHI's on LD_LIBRARY_PATH)")
    print(harness.machine_line())
    if args.repeat > 1:
        print(f"runs            {args.repeat} per side, fastest shown")
    print()
    print(f"{'':28}{'tessera':>14}{'SAHI':>14}{'ratio':>16}")
    print(f"{'wall time, process':28}{t.seconds:>13.2f}s{s.seconds:>13.2f}s{speedup:>10.2f}x faster")
    tw, sw = t.result["work_s"], s.result["work_s"]
    print(f"{'  of it: after imports':28}{tw:>13.2f}s{sw:>13.2f}s{sw / tw:>10.2f}x faster")
    t_rss, s_rss = harness.mb(t.max_rss_bytes), harness.mb(s.max_rss_bytes)
    print(f"{'peak RSS':28}{t_rss:>14}{s_rss:>14}{rss_ratio:>10.2f} of SAHI")
    tf, sf = t.result.get("first_tile_s"), s.result.get("first_tile_s")
    if tf is not None and sf is not None:
        print(f"{'time to first tile':28}{tf:>13.2f}s{sf:>13.2f}s{sf / tf:>10.2f}x sooner")
    print(f"{'tiles / slices':28}{t.result['tiles']:>14,}{s.result['tiles']:>14,}")
    print(f"{'detections':28}{t.result['detections']:>14,}{s.result['detections']:>14,}")
    if args.model == "near-free":
        print("(the near-free model marks bright cells, not the objects: precision and recall say nothing)")
    print(f"{'precision (IoU 0.5)':28}{pt:>14.3f}{ps:>14.3f}")
    print(f"{'recall (IoU 0.5)':28}{rt:>14.3f}{rs:>14.3f}")
    durations = s.result.get("durations", {})
    if durations:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in durations.items())
        print(f"SAHI's own timing: {parts}")
    print()
    print(harness.result_line("sahi_speedup", speedup, ">=", SPEED_GOAL))
    print(harness.result_line("sahi_rss_ratio", rss_ratio, "<=", RSS_GOAL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
