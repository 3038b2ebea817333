"""One shard, rendered and proven: its frames from Stellarium, each frame's geometry checked, and its part
of the labels manifest.

Layout of a job's output (a local directory or an ``s3://`` prefix, the job id appended)::

    <output>/<job_id>/frames/<job_id>-000000.png ...   the frames
    <output>/<job_id>/parts/shard-00000.jsonl ...      one manifest part per shard
    <output>/<job_id>/manifest.jsonl                   the parts merged, in frame order

Each manifest line is one frame's label, what the trainer's sky-position task reads
(``services/trainer/data/sky_manifest.py``: ``file`` relative to the job's directory, ``lat``, ``lon``,
``time``) and what a researcher needs to trust it: the camera, the atmosphere, the seed and index that
reproduce it, the Stellarium version that drew it, and the geometry check's verdict (``pass``: the bright
stars sit where astropy predicts; ``unverifiable``: fewer than three bright stars in the field). A frame
that **fails** the check fails its shard: a label the image does not match is never written.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.sky_generator.geometry import MIN_PREDICTED, FrameGeometry, check_frame
from services.sky_generator.job import Sample, SkyJob, samples
from services.sky_generator.stellarium import RenderError, render, stellarium_version

FRAMES_DIR = "frames"
PARTS_DIR = "parts"
MANIFEST = "manifest.jsonl"


class GeometryError(RenderError):
    """A rendered frame's bright stars are not where its label says: the shard fails."""


def part_name(shard: int) -> str:
    """The manifest part of ``shard``, relative to the job's directory."""
    return f"{PARTS_DIR}/shard-{shard:05d}.jsonl"


@dataclass(frozen=True)
class ShardResult:
    """A rendered shard: its frames (paths), its manifest lines, and what the geometry check found."""

    shard: int
    frames: list[Path]
    rows: list[dict[str, Any]]
    seconds: float

    @property
    def checked(self) -> list[dict[str, Any]]:
        """The geometry of the frames that could be checked."""
        return [r["geometry"] for r in self.rows if r["geometry"]["verdict"] == "pass"]

    @property
    def median_px(self) -> float | None:
        """The median over checked frames of each frame's median error."""
        values = sorted(g["median_px"] for g in self.checked)
        return values[len(values) // 2] if values else None

    @property
    def worst_px(self) -> float | None:
        """The largest error of any matched star in the shard."""
        return max((g["worst_px"] for g in self.checked), default=None)


def verdict(geometry: FrameGeometry) -> str:
    """``pass``, ``fail``, or ``unverifiable`` (too few bright stars in the field to tell)."""
    if len(geometry.predicted) < MIN_PREDICTED:
        return "unverifiable"
    return "pass" if geometry.passed() else "fail"


def render_shard(
    job: SkyJob,
    shard: int,
    job_dir: Path,
    *,
    version: str | None = None,
    on_frame: Callable[[Path], None] | None = None,
    check: Callable[..., FrameGeometry] = check_frame,
    cancel: threading.Event | None = None,
) -> ShardResult:
    """Render shard ``shard`` of ``job`` into ``job_dir``/frames, check every frame's geometry and write
    its manifest part; returns the result. A frame that fails the check raises :class:`GeometryError`
    (the part is not written); Stellarium's failures raise :class:`RenderError`."""
    started = time.monotonic()
    frames = samples(job, shard)
    try:
        paths = render(frames, job_dir / FRAMES_DIR, on_frame=on_frame, cancel=cancel)
        rows = _labels(job, frames, paths, version or stellarium_version(), check)
    except BaseException:
        for frame in frames:  # nothing half-written: a failed shard leaves none of its frames
            (job_dir / FRAMES_DIR / frame.file_name).unlink(missing_ok=True)
        raise
    part = job_dir / part_name(shard)
    part.parent.mkdir(parents=True, exist_ok=True)
    write_lines(part, rows)
    return ShardResult(shard=shard, frames=paths, rows=rows, seconds=time.monotonic() - started)


def _labels(
    job: SkyJob, frames: list[Sample], paths: list[Path], version: str, check: Callable[..., FrameGeometry]
) -> list[dict[str, Any]]:
    """Each frame's manifest line, its geometry checked; GeometryError at the first frame that fails."""
    rows = []
    for frame, path in zip(frames, paths, strict=True):
        geometry = check(path, frame)
        said = verdict(geometry)
        if said == "fail":
            raise GeometryError(
                f"frame {frame.index} ({frame.file_name}) does not show the sky its label says: "
                f"{geometry.summary()}"
            )
        rows.append(
            {
                **frame.to_json(),
                "file": f"{FRAMES_DIR}/{frame.file_name}",
                "seed": job.seed,
                "stellarium": version,
                "geometry": {
                    "verdict": said,
                    "predicted": len(geometry.predicted),
                    "matched": geometry.matched,
                    "median_px": round(geometry.median_px, 3) if geometry.matched else None,
                    "worst_px": round(geometry.worst_px, 3) if geometry.matched else None,
                },
            }
        )
    return rows


def write_lines(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines to ``path`` whole (see :func:`write_text`)."""
    write_text(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole: a temporary file renamed into place."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def merge_parts(texts: Iterable[str]) -> str:
    """The job's manifest from its parts' texts: every line once, in frame order."""
    rows: dict[int, str] = {}
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                rows[int(json.loads(line)["index"])] = line
    return "".join(rows[index] + "\n" for index in sorted(rows))
