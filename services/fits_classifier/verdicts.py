"""Frames judged: a file's bytes in, a :class:`Verdict` out, whatever the bytes are.

:func:`judge` reads each frame (:func:`services.frames.read_frame`), prepares it with the model's own
preprocessing and classifies the readable ones in one batch. A frame that cannot be read or prepared gets
an ``UNREADABLE`` verdict whose ``reason`` says what is wrong with the file; it never stops the others.
The checksum is the SHA-256 of the bytes as received, so a verdict is tied to exactly the file it judged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.errors import UserError
from services.fits_classifier.model import FrameClassifier, Scores
from services.frames import read_frame

CLASSIFIED = "CLASSIFIED"
UNREADABLE = "UNREADABLE"
#: The verdict of a frame that could not be read.
UNREADABLE_VERDICT = "unreadable"


@dataclass(frozen=True)
class Verdict:
    """One frame's verdict (a row of ``fits_verdicts``)."""

    source: str
    checksum: str
    size_bytes: int
    status: str
    verdict: str
    score: float | None
    probabilities: dict[str, float] | None
    reason: str | None
    hdu: str | None
    model_name: str
    model_version: str
    seconds: float
    classified_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    def as_json(self) -> dict[str, Any]:
        """The verdict as a JSON object (a line of the JSON lines report)."""
        return {
            "source": self.source,
            "status": self.status,
            "verdict": self.verdict,
            "score": None if self.score is None else round(self.score, 6),
            "probabilities": None
            if self.probabilities is None
            else {k: round(v, 6) for k, v in self.probabilities.items()},
            "reason": self.reason,
            "hdu": self.hdu,
            "checksum": self.checksum,
            "size_bytes": self.size_bytes,
            "model": {"name": self.model_name, "version": self.model_version},
            "seconds": round(self.seconds, 4),
            "classified_at": self.classified_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }


def checksum(raw: bytes) -> str:
    """SHA-256 of a file's bytes, in hex: the frame's identity in verdicts."""
    return hashlib.sha256(raw).hexdigest()


def judge(
    classifier: FrameClassifier, frames: Sequence[tuple[str, bytes]], *, hdu: int | str | None = None
) -> list[Verdict]:
    """A verdict for each ``(source, bytes)`` in ``frames``, in order; see the module docstring.

    ``hdu``: the HDU to classify in every file (index or EXTNAME), else each file's first image HDU.
    """
    prepared: list[np.ndarray] = []
    slots: list[int] = []
    verdicts: list[Verdict | None] = [None] * len(frames)
    started = [0.0] * len(frames)  # when each frame was started; for a prepared one, its preparing time
    hdus: list[str | None] = [None] * len(frames)
    for index, (source, raw) in enumerate(frames):
        started[index] = time.perf_counter()
        try:
            frame = read_frame(raw, hdu=hdu)
            hdus[index] = frame.hdu_name or str(frame.hdu_index)
            if not np.isfinite(frame.data).any():
                rows, columns = frame.data.shape
                raise UserError(
                    f"HDU {_hdu_label(frame.hdu_index, frame.hdu_name)}: every one of its {rows} x {columns} "
                    "pixels is blank (NaN or BLANK) or infinite, so there is nothing to classify: the "
                    "readout failed or the wrong HDU was written"
                )
            prepared.append(classifier.prepare(frame.data))
            slots.append(index)
            started[index] = time.perf_counter() - started[index]  # now the seconds spent preparing
        except UserError as error:
            verdicts[index] = unreadable(
                classifier, source, raw, _reason(error), hdu=hdus[index], started=started[index]
            )
        except MemoryError:
            reason = "the frame is too large to prepare in this worker's memory"
            verdicts[index] = unreadable(
                classifier, source, raw, reason, hdu=hdus[index], started=started[index]
            )
    if prepared:
        batch_started = time.perf_counter()
        scores = _scores(classifier, prepared)
        per_frame = (time.perf_counter() - batch_started) / len(prepared)
        for index, score in zip(slots, scores, strict=True):
            source, raw = frames[index]
            if isinstance(score, UserError):
                verdicts[index] = unreadable(
                    classifier,
                    source,
                    raw,
                    f"the model could not judge this frame: {score}",
                    hdu=hdus[index],
                    started=time.perf_counter() - started[index] - per_frame,
                )
                continue
            verdicts[index] = Verdict(
                source=source,
                checksum=checksum(raw),
                size_bytes=len(raw),
                status=CLASSIFIED,
                verdict=score.label,
                score=score.score,
                probabilities=score.probabilities,
                reason=None,
                hdu=hdus[index],
                model_name=classifier.name,
                model_version=classifier.version,
                seconds=started[index] + per_frame,
            )
    return [v for v in verdicts if v is not None]


def _scores(classifier: FrameClassifier, prepared: list[np.ndarray]) -> list[Scores | UserError]:
    """The model's scores for ``prepared`` frames in one call; should the model refuse the batch (non-finite
    logits), each frame is scored alone so that only the frame it cannot judge is lost."""
    try:
        return list(classifier.classify(np.stack(prepared)))
    except UserError:
        if len(prepared) == 1:
            raise
    alone: list[Scores | UserError] = []
    for row in prepared:
        try:
            [score] = classifier.classify(row[None])
            alone.append(score)
        except UserError as error:
            alone.append(error)
    return alone


def _hdu_label(index: int, name: str) -> str:
    return f"{index} ({name})" if name else str(index)


#: How the reader names bytes it was given ("FITS data (N bytes)"), which a verdict names by its source.
_BYTES_PREFIX = re.compile(r"FITS data \(\d+ bytes\)(?P<joint>, |: | )")


def _reason(error: UserError) -> str:
    """The reading error with "the file" for the reader's "FITS data (N bytes)" (the verdict names its
    source): "the file is truncated: ...", "HDU 0 (PRIMARY): the image is a 3-D cube ..."."""
    text = str(error)
    match = _BYTES_PREFIX.match(text)
    if match is None:
        return text
    rest = text[match.end() :]
    return f"the file {rest}" if match["joint"] == " " else rest


def unreadable(
    classifier: FrameClassifier,
    source: str,
    raw: bytes,
    reason: str,
    *,
    hdu: str | None = None,
    started: float,
    digest: str | None = None,
    size: int | None = None,
) -> Verdict:
    """An UNREADABLE verdict for ``source`` (``digest``/``size`` when the bytes were streamed, not held)."""
    return Verdict(
        source=source,
        checksum=digest or checksum(raw),
        size_bytes=len(raw) if size is None else size,
        status=UNREADABLE,
        verdict=UNREADABLE_VERDICT,
        score=None,
        probabilities=None,
        reason=reason,
        hdu=hdu,
        model_name=classifier.name,
        model_version=classifier.version,
        seconds=time.perf_counter() - started,
    )
