"""The sights demo's figures: the held-out photos recognised through the API and scored against the
generator's boxes (:func:`recognise_held_out`), a few of them drawn (:func:`draw_sheet`), and the summary
printed (:func:`print_summary`)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from services.sight_catalog.demo import DemoResult, Generated

IOU = 0.5
SHEET_PHOTOS = 8


def warm_up_photo(generated: Sequence[Generated], held: Sequence[Generated]) -> Generated:
    """A training photo (not scored) for the call that opens the model."""
    chosen = {g.path for g in held}
    return next((g for g in generated if g.path not in chosen), generated[0])


def post_photo(url: str, data: bytes, media_type: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """POST a photo's bytes to a recognitions URL; the JSON answer (RuntimeError with the problem)."""
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": media_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {url}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from None


def recognise_held_out(  # noqa: PLR0917 (one caller, what it gathered)
    result: DemoResult, base: str, slug: str, held: Sequence[Generated], warm: Generated, console: Any
) -> None:
    """Post every held-out photo to the API, one at a time, and score its answers."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.scenes.scoring import Score, score_detections

    url = f"{base}/api/cities/{slug}/recognitions"
    began = time.perf_counter()
    post_photo(url, warm.path.read_bytes(), warm.media_type)
    result.warm_up_ms = (time.perf_counter() - began) * 1000
    ids = {p["source"]: p["image_id"] for p in result.per_photo}
    per_photo: list[dict[str, Any]] = []
    total = Score(0, 0, 0)
    latencies: list[float] = []
    columns = (TextColumn("[bold]recognising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("recognising", total=len(held))
        started = time.perf_counter()
        for photo in held:
            data = photo.path.read_bytes()
            began = time.perf_counter()
            answer = post_photo(url, data, photo.media_type)
            latencies.append(time.perf_counter() - began)
            found = answer["sights"]
            score = score_detections(
                np.array([[f["box"][k] for k in ("x0", "y0", "x1", "y1")] for f in found], np.float64),
                np.array([f["score"] for f in found], np.float64),
                np.array([f["sight"] for f in found], object),
                np.array([box for _, box in photo.truth], np.float64),
                np.array([sight for sight, _ in photo.truth], object),
                iou_threshold=IOU,
            )
            total = total + score
            per_photo.append(
                {
                    "source": str(photo.path.resolve()),
                    "file": str(photo.path),
                    "image_id": ids.get(str(photo.path.resolve())),
                    "held_out": True,
                    "seed": photo.seed,
                    "main": photo.main,
                    "media_type": photo.media_type,
                    "orientation": photo.orientation,
                    "truth": [{"sight": s, "box": list(b)} for s, b in photo.truth],
                    "found": found,
                    "model_version": answer["model"]["version"],
                    "width": answer["width"],
                    "height": answer["height"],
                    "true_positives": score.true_positives,
                    "false_positives": score.false_positives,
                    "false_negatives": score.false_negatives,
                    "seconds": latencies[-1],
                }
            )
            bar.advance(task)
        elapsed = time.perf_counter() - started
    result.per_photo = per_photo
    result.recognitions = len(per_photo)
    result.true_positives, result.false_positives = total.true_positives, total.false_positives
    result.false_negatives = total.false_negatives
    result.precision, result.recall = total.precision, total.recall
    result.recognitions_per_second = len(per_photo) / elapsed if elapsed > 0 else 0.0
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    result.latency_ms = {"p50": float(p50), "p99": float(p99), "max": float(max(latencies) * 1000)}


# --- the picture ------------------------------------------------------------------------------------------

_TRUE, _FOUND, _WRONG = (40, 200, 80), (255, 140, 0), (230, 30, 30)


def draw_sheet(result: DemoResult, held: Sequence[Generated], path: Path, *, scale: int = 2) -> None:
    """A few held-out photos, upright: the generator's boxes in green, the API's in orange (red when they
    match no true box), each labelled with its sight and score."""
    from PIL import Image, ImageDraw, ImageOps

    from services.scenes.scoring import score_detections

    shown = [(g, p) for g, p in zip(held, result.per_photo, strict=True)][:SHEET_PHOTOS]
    if not shown:
        return
    cell_w = max(int(r["width"]) for _, r in shown) * scale
    cell_h = max(int(r["height"]) for _, r in shown) * scale
    caption, gap, columns = 18, 8, 4
    rows = (len(shown) + columns - 1) // columns
    sheet = Image.new(
        "RGB", (columns * (cell_w + gap) + gap, rows * (cell_h + caption + gap) + gap), (24, 24, 24)
    )
    draw = ImageDraw.Draw(sheet)
    for index, (photo, record) in enumerate(shown):
        with Image.open(photo.path) as opened:
            upright = ImageOps.exif_transpose(opened).convert("RGB")
        big = upright.resize((upright.width * scale, upright.height * scale), Image.Resampling.NEAREST)
        left = gap + (index % columns) * (cell_w + gap)
        top = gap + (index // columns) * (cell_h + caption + gap)
        sheet.paste(big, (left, top))
        for truth in record["truth"]:
            _rectangle(draw, [v * scale for v in truth["box"]], (left, top), _TRUE, 1)
        for found in record["found"]:
            box = [found["box"][k] for k in ("x0", "y0", "x1", "y1")]
            alone = score_detections(
                np.array([box]),
                np.array([1.0]),
                np.array([found["sight"]], object),
                np.array([t["box"] for t in record["truth"]], np.float64),
                np.array([t["sight"] for t in record["truth"]], object),
                iou_threshold=IOU,
            )
            colour = _FOUND if alone.true_positives else _WRONG
            x0, y0, _, _ = _rectangle(draw, [v * scale for v in box], (left, top), colour, 2)
            draw.text((x0 + 3, y0 + 2), f"{found['sight']} {found['score']:.2f}", fill=colour)
        missed, wrong = record["false_negatives"], record["false_positives"]
        text = "all found" if not (missed or wrong) else f"{missed} missed, {wrong} wrong"
        draw.text((left, top + cell_h + 3), f"{Path(record['file']).name}: {text}", fill=(220, 220, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def _rectangle(
    draw: Any, box: Sequence[float], origin: tuple[int, int], colour: tuple[int, int, int], width: int
) -> tuple[float, float, float, float]:
    """Outline ``box`` (x1 and y1 exclusive) at ``origin``, at least a pixel each way; its corners drawn."""
    x0, y0 = origin[0] + box[0], origin[1] + box[1]
    x1, y1 = max(x0, origin[0] + box[2] - 1), max(y0, origin[1] + box[3] - 1)
    draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    return x0, y0, x1, y1


def print_summary(result: DemoResult, console: Any) -> None:
    """The demo's figures as a table."""
    from rich.table import Table

    table = Table(title=f"tessera sights demo: {result.city}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("sights", ", ".join(result.sights.values()))
    table.add_row(
        "photos",
        f"{result.photos} generated, {result.ingested} ingested; {result.training_photos} to train on "
        f"(labelled by {result.labeller}), {result.held_out_photos} held out",
    )
    model = result.model
    table.add_row(
        "model",
        f"v{model.get('version')} READY as {model.get('registry_name')}:{model.get('registry_version')}; "
        f"trained in {result.training_seconds:.1f} s (READY {result.seconds_to_ready:.1f} s after the "
        "workers started)",
    )
    found = result.true_positives + result.false_positives
    known = result.true_positives + result.false_negatives
    table.add_row(
        "precision",
        f"{result.true_positives} of {found} detections right ({result.precision:.1%}), IoU >= {IOU} and the "
        "same sight",
    )
    table.add_row("recall", f"{result.true_positives} of {known} sights found ({result.recall:.1%})")
    latency = result.latency_ms
    table.add_row(
        "recognitions",
        f"{result.recognitions} held-out photos through POST /api/cities/{result.slug}/recognitions, one "
        f"at a time: {result.recognitions_per_second:.1f}/s, p50 {latency.get('p50', 0):.0f} ms, "
        f"p99 {latency.get('p99', 0):.0f} ms (the first call, opening the model: {result.warm_up_ms:.0f} ms)",
    )
    for name, label in (("recognitions", "picture"), ("result", "result"), ("logs", "logs")):
        if name in result.files:
            table.add_row(label, result.files[name])
    table.add_row("wall time", f"{result.seconds:.1f} s")
    console.print(table)
