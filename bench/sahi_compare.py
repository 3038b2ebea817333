"""Against SAHI: tessera and SAHI's sliced prediction on the same image, model, slicing; wall time and RSS.

Run: ``.venv/bin/python bench/sahi_compare.py`` (an 8,192 x 8,192 px scene; ``--quick`` for a smoke run).

Both sides run the shipped ONNX detector on ONNX Runtime's CPU provider (same graph optimisations, same
default thread count) in batches of 8, over the same 512 px tiles with the same 64 px overlap, on the same
GeoTIFF, each in its own child process, whose wall time and peak RSS (``wait4``) are measured:

- **tessera**: what a worker runs: every region through ``detect_region`` (lazy block-aligned reads,
  prefetch, batches, the model, the in-region merge), then the seam merge.
- **SAHI**: ``sahi.predict.get_sliced_prediction`` with a ``DetectionModel`` subclass wrapping the same
  ONNX file in ONNX Runtime (no torch), batched natively; SAHI decodes the whole image (OpenCV), slices it,
  and merges with its own postprocess (default GREEDYNMM on IOS 0.5, class-aware; no extra full-image
  prediction, since the model takes 512 px tiles only).

SAHI lives in its own virtualenv, created on first use (``--sahi-venv``; ``bench/requirements-sahi.txt``
plus the project environment's numpy, onnxruntime-gpu and pillow versions), never in the project's.
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

SPEED_GOAL = 3.0  # tessera at least this many times faster
RSS_GOAL = 0.25  # tessera's peak RSS at most this fraction of SAHI's
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-sahi.txt"
PINNED_FROM_PROJECT = ("numpy", "onnxruntime-gpu", "pillow")
SCORE_THRESHOLD = 0.25  # the request default (MergeSettings.score_threshold)


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
    """Detect over the whole image as a worker does; save the boxes; print the figures."""
    started = time.perf_counter()
    from services.inference.detections import Detections
    from services.inference.detector import OnnxDetector
    from services.model_runner import pipeline
    from services.model_runner.request import DEFAULT_REGION, MergeSettings
    from services.tiling.reader import RasterSource

    imported = time.perf_counter()
    detector = OnnxDetector(
        harness.MODEL, providers=args.providers, batch_size=args.batch, score_threshold=SCORE_THRESHOLD
    )
    grid = pipeline.Grid(
        detector.tile_width, detector.tile_height, args.overlap, args.overlap, DEFAULT_REGION, DEFAULT_REGION
    )
    merge = MergeSettings()
    tiles = 0
    with RasterSource.open(args.image) as source:
        plan = pipeline.plan_job(grid, source, None)
        parts: list[Detections] = []
        for region in plan.regions:
            outcome = pipeline.detect_region(
                source,
                detector,
                pipeline.region_tiles(grid, region, source.width, source.height, None),
                batch_size=detector.batch_size,
                merge=merge,
            )
            parts.append(outcome.detections)
            tiles += outcome.tiles
        found = pipeline.merge_seams(parts, plan.regions, grid, merge)
    done = time.perf_counter()
    np.savez(args.out, boxes=found.boxes, scores=found.scores, labels=found.labels)
    harness.report_child(
        {
            "import_s": imported - started,
            "work_s": done - imported,
            "tiles": tiles,
            "detections": len(found),
            "peak_rss": harness.peak_rss_bytes(),
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

    class OnnxSahiModel(DetectionModel):
        """The tessera detector contract (boxes/scores/labels outputs, x/255 input) as a SAHI model."""

        def load_model(self) -> None:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = ["CPUExecutionProvider"]
            if args.providers != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.set_model(ort.InferenceSession(self.model_path, options, providers=providers))

        def set_model(self, model: Any, **kwargs: Any) -> None:
            self.model = model
            names = json.loads(model.get_modelmeta().custom_metadata_map["tessera.class_names"])
            self.category_mapping = {str(i): name for i, name in enumerate(names)}
            shape = model.get_inputs()[0].shape
            self._tile = (int(shape[2]), int(shape[3]))

        def perform_inference(self, image: np.ndarray) -> None:
            self._run([image])

        def perform_batch_inference(self, images: list[np.ndarray]) -> None:
            # Native batching (as SAHI's Ultralytics model does): one session run per batch of slices.
            self._run(images)

        def _run(self, images: list[np.ndarray]) -> None:
            h, w = self._tile
            batch = np.zeros((len(images), 3, h, w), np.float32)
            for i, image in enumerate(images):  # HWC uint8 RGB -> CHW float32 / 255; edge slices padded
                batch[i, :, : image.shape[0], : image.shape[1]] = image.transpose(2, 0, 1)[:3] / np.float32(
                    255
                )
            self._original_predictions = self.model.run(None, {self.model.get_inputs()[0].name: batch})

        def _create_object_prediction_list_from_original_predictions(
            self,
            shift_amount_list: list[list[int | float]] | None = None,
            full_shape_list: list[list[int | float]] | None = None,
        ) -> None:
            boxes, scores, labels = self._original_predictions
            per_image = []
            for i in range(boxes.shape[0]):
                keep = np.flatnonzero(scores[i] >= self.confidence_threshold)
                shift = shift_amount_list[i] if shift_amount_list else [0, 0]
                full = full_shape_list[i] if full_shape_list else None
                per_image.append(
                    [
                        ObjectPrediction(
                            bbox=boxes[i, k].tolist(),
                            category_id=int(labels[i, k]),
                            category_name=self.category_mapping[str(int(labels[i, k]))],
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
    model = OnnxSahiModel(model_path=str(harness.MODEL), confidence_threshold=SCORE_THRESHOLD, device="cpu")
    ratio = args.overlap / 512
    result = get_sliced_prediction(
        args.image,
        model,
        slice_height=512,
        slice_width=512,
        overlap_height_ratio=ratio,
        overlap_width_ratio=ratio,
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
    slices = get_slice_bboxes(height, width, 512, 512, False, ratio, ratio)
    harness.report_child(
        {
            "import_s": imported - started,
            "work_s": done - imported,
            "tiles": len(slices),
            "detections": len(predictions),
            "peak_rss": harness.peak_rss_bytes(),
            "durations": {k: float(v) for k, v in result.durations_in_seconds.items()},
            "sahi": version("sahi"),
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
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--overlap", type=int, default=64, help="px (64: tessera's default for 512 px tiles)")
    p.add_argument("--postprocess", default="GREEDYNMM", help="SAHI postprocess: GREEDYNMM, NMM, NMS")
    p.add_argument("--match-metric", default="IOS", help="SAHI match metric: IOS or IOU")
    p.add_argument("--match-threshold", type=float, default=0.5)
    p.add_argument(
        "--gdal-cachemax",
        default="64",
        help="GDAL block cache for tessera's child, MB (64, the worker setting bench/memory.py recommends), "
        "or 'default' for GDAL's own (5%% of RAM)",
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
    p.add_argument("--quick", action="store_true", help="smoke run: a 1024 px image")
    p.add_argument("--child", choices=("tessera", "sahi"), help=argparse.SUPPRESS)
    p.add_argument("--image", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "tessera":
        tessera_child(args)
        return 0
    if args.child == "sahi":
        sahi_child(args)
        return 0
    if args.quick:
        args.size = 1024

    scene = harness.scene_file(args.data_dir, args.size, args.size)
    sahi_python = ensure_sahi_venv(args.sahi_venv)
    common = ["--image", str(scene.path), "--batch", str(args.batch), "--overlap", str(args.overlap)]
    common += ["--providers", args.providers]
    sahi_opts = ["--postprocess", args.postprocess, "--match-metric", args.match_metric]
    sahi_opts += ["--match-threshold", str(args.match_threshold)]
    runs: dict[str, harness.ChildRun] = {}
    env = {**os.environ, "OPENCV_LOG_LEVEL": "ERROR"}  # OpenCV warns about every GeoTIFF tag it skips
    env.pop("GDAL_CACHEMAX", None)
    cache = "GDAL's default block cache (5% of RAM)"
    if args.gdal_cachemax != "default":
        env["GDAL_CACHEMAX"] = str(int(args.gdal_cachemax))
        cache = f"GDAL_CACHEMAX={int(args.gdal_cachemax)} MB"
    for _ in range(max(1, args.repeat)):
        for side, python, extra in (("tessera", sys.executable, []), ("sahi", str(sahi_python), sahi_opts)):
            out = args.data_dir / f"detections-{side}-{args.size}.npz"
            argv_child = [python, __file__, "--child", side, *common, "--out", str(out), *extra]
            run = harness.run_measured(argv_child, env=env, echo=lambda line: print("  | " + line))
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
        f"image           {args.size:,} x {args.size:,} px, 3 x uint8 GeoTIFF, tiled 512 px, DEFLATE "
        f"({scene.path.stat().st_size / 1e6:,.0f} MB; {args.size**2 * 3 / 1e6:,.0f} MB decoded); "
        f"{len(scene.layout):,} known objects"
    )
    print(
        f"model           {harness.MODEL.name}, ONNX Runtime {onnxruntime.__version__} CPU, "
        f"batch {args.batch}; 512 px tiles, overlap {args.overlap} px"
    )
    print(f"tessera         worker pipeline (detect_region per region + seam merge); {cache}")
    print(
        f"SAHI            {s.result.get('sahi', '?')}: {args.postprocess} / {args.match_metric} "
        f"{args.match_threshold}, class-aware, no standard (full-image) prediction"
    )
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
    print(f"{'tiles / slices':28}{t.result['tiles']:>14,}{s.result['tiles']:>14,}")
    print(f"{'detections':28}{t.result['detections']:>14,}{s.result['detections']:>14,}")
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
