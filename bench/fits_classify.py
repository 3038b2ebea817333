"""FITS frame classification: frames per second per core for full-size frames, and where the time goes.

Run: ``.venv/bin/python bench/fits_classify.py`` (``--quick`` for a smoke run; ``--model`` for another
classifier than the shipped one).

Frames: ``--frames`` generated 2048 x 2056 frames (:mod:`services.frames.synthetic`; a third each good,
mirror wobble and shutter fault), written as a CCD writes them (unsigned 16-bit, BZERO 32768; every fourth
tile-compressed ``.fz``) and held as file bytes, so generating them costs nothing here. Each frame then
goes through the service's own steps, timed one by one, on one core (ONNX Runtime with one thread; NumPy's
median and percentile are single-threaded):

1. **read**: :func:`services.frames.read_frame` on the bytes (structure check, astropy, BZERO/BSCALE, .fz
   decompression);
2. **fill**: NaN/inf replaced (:func:`services.frames.preprocess.fill_missing`);
3. **bin**: boxcar median by the model's factor (:func:`~services.frames.preprocess.bin_median`; 9 for
   these frames when the model chooses it per frame);
4. **stretch** and **fit** (crop/pad) to the model's input;
5. **stamps**: the star-stamp view (:func:`~services.frames.preprocess.star_stamps`), when the model's
   preprocessing has one (``tessera.frames.stamps``; 0 s otherwise);
6. **model**: the classifier on batches of ``--batch`` prepared frames (per frame: batch time / batch).

Figures: seconds per frame of each step (median over frames) and its share; frames/s per core = 1 / the
sum; CPU seconds per frame (``time.process_time``) as a cross-check. The binning is compared with a
reference written as the original's external script did it, a Python loop over the bins (on a crop, scaled
to the frame): ``RESULT bin_speedup`` is the reference's time over ours, and ``RESULT bin_share`` says
whether binning is the bottleneck (its share of a frame's time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import machine_line

STEPS = ("read", "fill", "bin", "stretch", "fit", "stamps", "model")
FULL = (2048, 2056)


def frame_files(count: int, shape: tuple[int, int], seed: int) -> list[tuple[str, bytes]]:
    """``count`` generated frames as FITS file bytes (every fourth tile-compressed)."""
    import tempfile

    from services.frames import CLASSES, generate_frame, write_fits

    files = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(count):
            label = CLASSES[index % len(CLASSES)]
            name = f"f{index}.fits.fz" if index % 4 == 3 else f"f{index}.fits"
            path = write_fits(Path(scratch) / name, generate_frame(label, seed + index, shape))
            files.append((name, path.read_bytes()))
    return files


def reference_bin(frame: np.ndarray, factor: int) -> np.ndarray:
    """Binning as a per-bin Python loop (how the original's external script did it)."""
    rows, columns = frame.shape[0] // factor, frame.shape[1] // factor
    out = np.empty((rows, columns), np.float32)
    for r in range(rows):
        for c in range(columns):
            out[r, c] = np.median(frame[r * factor : (r + 1) * factor, c * factor : (c + 1) * factor])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the figures and the RESULT lines."""
    from services.fits_classifier.model import SHIPPED_MODEL, FrameClassifier
    from services.frames import read_frame
    from services.frames.preprocess import (
        auto_bin_factor,
        bin_median,
        fill_missing,
        fit_square,
        star_stamps,
        stretch_frame,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=12, help="frames to time (default %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="frames per model call (default %(default)s)")
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="the classifier (default: shipped)")
    parser.add_argument("--quick", action="store_true", help="3 frames of 1024 x 1028: a smoke run")
    args = parser.parse_args(argv)
    shape = (1024, 1028) if args.quick else FULL
    count = 3 if args.quick else args.frames
    batch = min(args.batch, count)

    classifier = FrameClassifier(args.model, providers="cpu", threads=1)
    spec = classifier.spec
    print(machine_line())
    print(f"model           {classifier.describe()}")
    started = time.perf_counter()
    files = frame_files(count, shape, seed=4242)
    size_mb = statistics.median(len(raw) for _, raw in files) / 1e6
    print(
        f"frames          {count} of {shape[0]} x {shape[1]} generated in "
        f"{time.perf_counter() - started:.1f} s ({size_mb:.1f} MB each, median)"
    )

    times: dict[str, list[float]] = {step: [] for step in STEPS}
    prepared = []
    cpu_started = time.process_time()
    wall_started = time.perf_counter()
    factor = 1
    for _, raw in files:
        t0 = time.perf_counter()
        data = read_frame(raw).data
        t1 = time.perf_counter()
        frame = fill_missing(data)
        t2 = time.perf_counter()
        factor = spec.bin_factor or auto_bin_factor(frame.shape, spec.size)
        binned = bin_median(frame, factor)
        t3 = time.perf_counter()
        stretched = stretch_frame(binned, spec.stretch)
        t4 = time.perf_counter()
        whole = fit_square(stretched, spec.size)
        t5 = time.perf_counter()
        views = (
            [whole, star_stamps(frame, binned, factor, spec.size, spec.stamps)] if spec.stamps else [whole]
        )
        prepared.append(np.stack(views))
        t6 = time.perf_counter()
        spent = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
        for step, seconds in zip(STEPS, spent, strict=False):
            times[step].append(seconds)
    for start in range(0, count, batch):
        chunk = np.stack(prepared[start : start + batch])
        t0 = time.perf_counter()
        classifier.classify(chunk)
        per_frame = (time.perf_counter() - t0) / len(chunk)
        times["model"].extend([per_frame] * len(chunk))
    wall = time.perf_counter() - wall_started
    cpu = time.process_time() - cpu_started
    assert np.array_equal(prepared[-1], classifier.prepare(data)), "the timed steps differ from the service's"

    medians = {step: statistics.median(values) for step, values in times.items()}
    total = sum(medians.values())
    print(f"{'step':<16}{'s/frame':>10}{'share':>8}")
    for step in STEPS:
        print(f"{step:<16}{medians[step]:>10.4f}{medians[step] / total:>8.1%}")
    print(f"{'total':<16}{total:>10.4f}")
    print(
        f"per core        {1 / total:.2f} frames/s (sum of the median steps); CPU {cpu / count:.3f} s/frame, "
        f"wall {wall / count:.3f} s/frame over the run"
    )

    # The reference binning on a crop of the last frame (the loop is slow), scaled to the whole frame.
    crop = frame[: min(frame.shape[0], 64 * factor), : min(frame.shape[1], 64 * factor)]
    t0 = time.perf_counter()
    expected = reference_bin(crop, factor)
    reference_s = (
        (time.perf_counter() - t0) * (frame.shape[0] // factor * (frame.shape[1] // factor)) / expected.size
    )
    assert np.array_equal(expected, bin_median(crop, factor)), (
        "the vectorised binning disagrees with the loop"
    )
    print(
        f"binning         {factor}x{factor}: {medians['bin']:.4f} s vectorised, {reference_s:.2f} s as a "
        "Python loop over bins (the original's script; same values)"
    )
    print(f"RESULT frames_per_s_per_core={1 / total:.3f} cpu_s_per_frame={cpu / count:.3f}")
    print(f"RESULT bin_speedup={reference_s / medians['bin']:.1f} bin_share={medians['bin'] / total:.3f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
